"""distlm: distributed LM training on Ray workers with DeepSpeed ZeRO."""

__version__ = "0.1.0"
