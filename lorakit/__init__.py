"""lorakit: turn an open chat model into your own assistant on one GPU, and prove it worked."""

__version__ = "0.1.0"
