"""The KV-cache argument of a transformers model call, under its current name.

transformers 5.x renamed `past_key_values` to `cache` (argument and output field) and warns on the
old name; older releases know only the old one. Every call that passes or reads a cache goes through
these two helpers, so no command prints a deprecation warning on either version.
"""

from __future__ import annotations

import inspect

from transformers import LlamaForCausalLM

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def with_cache(cache) -> dict:
    """{CACHE_ARG: cache}: the keyword to pass a cache to a model call."""
    return {CACHE_ARG: cache}


def cache_of(output):
    """The cache a model call returned."""
    return output[CACHE_ARG] if CACHE_ARG in output else None
