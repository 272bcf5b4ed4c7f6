"""lorakit: turn an open chat model into your own assistant on one GPU, and prove it worked."""

import warnings

__version__ = "0.1.0"

# peft (0.21) still reads transformers' renamed `is_gradient_checkpointing` when it wraps or loads an
# adapter; the warning is about peft's code, not the user's, and lorakit's own code uses the current API.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)
