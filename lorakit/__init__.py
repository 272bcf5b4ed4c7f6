"""lorakit: turn an open chat model into your own assistant on one GPU, and prove it worked."""

import logging
import warnings

__version__ = "0.1.0"

# peft (0.21) still reads transformers' renamed `is_gradient_checkpointing` when it wraps or loads an
# adapter; the warning is about peft's code, not the user's, and lorakit's own code uses the current API.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)

# bitsandbytes 0.50 (a test dependency; QLoRA's) on a CPU with AVX512-BF16 tries, when peft imports it, to fetch an
# optional CPU matmul kernel from the hub and logs "Failed to load CPU gemm_4bit_forward" when it cannot (offline,
# or the hub's trust check): on every command. lorakit's CPU QLoRA path does not use that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
