"""distlm: distributed LM training on Ray workers with DeepSpeed ZeRO."""

import warnings

__version__ = "0.1.0"

# peft (0.21) asks every model it wraps for transformers' deprecated `is_gradient_checkpointing`:
# a FutureWarning on every run's console about code that is not the user's.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
