"""Evaluation: the confusion-matrix segmentation metric and COCO RLE result files."""
