"""Where things live: the cache root, the built-in data folder, and what a hub ID looks like.

Defined once here (below every other module) so the model cache, the data cache, the built-in
data and the hub-ID rule cannot drift apart."""

from __future__ import annotations

import os
import re
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "builtin"
"The built-in data files: self-cognition, general prompts, identity probes, retention questions."

HUB_ID_PATTERN = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
"org/name, as the Hugging Face hub and ModelScope spell a repository."
HUB_ID = re.compile(f"^{HUB_ID_PATTERN}$")


def cache_root() -> Path:
    """LORAKIT_CACHE, default ~/.cache/lorakit: converted models under models/, rendered data under data/."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
