"""Weak-shot semantic segmentation: SimFormer and its baselines as a Snakemake pipeline.

Every DAG stage has one rule file under ``rules/``, one CLI subcommand (``python -m weakshot <stage>``)
and one module here, sharing a name.
"""

__version__ = "0.1.0"
