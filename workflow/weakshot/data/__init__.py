"""Datasets: archives (download, verify, extract), converters to the prepared layout, the embedded
generator, and class splits."""
