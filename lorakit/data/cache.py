"""On-disk cache of rendered samples, keyed by the conversations' content, tokenizer, template and flags.

The key hashes the normalised conversations themselves (so a changed file, a different #N sample
or other --model_name values all miss), the tokenizer's full definition, its chat template, the
system prompt and --loss_on_prompt. Values are one .npz per dataset: concatenated token ids, a
loss mask and per-sample lengths. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from lorakit.data.render import IGNORE_INDEX, Rendered
from lorakit.paths import cache_root

CACHE_VERSION = "render-v2"  # bump when render.py changes what it produces


def cache_dir() -> Path:
    """Folder for cached tokenised data (LORAKIT_CACHE/data, default ~/.cache/lorakit/data)."""
    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything about a tokenizer that changes its ids: vocab, merges, added tokens, chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(str(getattr(tokenizer, "chat_template", None)).encode("utf-8"))
    return h.hexdigest()


def cache_key(messages: list[list[dict]], *, tokenizer_fp: str, system: str | None, loss_on_prompt: bool) -> str:
    """Key for one dataset's rendered samples."""
    h = hashlib.sha256()
    head = {"v": CACHE_VERSION, "tok": tokenizer_fp, "system": system, "loss_on_prompt": loss_on_prompt}
    h.update(json.dumps(head, sort_keys=True).encode("utf-8"))
    for m in messages:
        h.update(json.dumps(m, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:32]


def load_cached(key: str, folder: Path | None = None) -> list[Rendered] | None:
    """Rendered samples stored under `key`, or None if absent or unreadable."""
    path = (folder or cache_dir()) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            ids, mask, lengths = z["ids"], z["mask"], z["lengths"]
    except (OSError, ValueError, KeyError):
        return None  # a torn or foreign file: re-render, the next save replaces it
    out = []
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    labels_all = np.where(mask, ids, IGNORE_INDEX)
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append(Rendered(input_ids=ids[a:b].tolist(), labels=labels_all[a:b].tolist()))
    return out


def save_cached(key: str, samples: list[Rendered], folder: Path | None = None) -> Path:
    """Store samples under `key` atomically; returns the file path."""
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int64)
    mask = np.fromiter((l != IGNORE_INDEX for s in samples for l in s.labels), dtype=bool)
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.int64)
    path = folder / f"{key}.npz"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=ids, mask=mask, lengths=lengths)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write a cache file whole or not at all, through a temporary file of this call's own (two processes
    filling the same cache at once each replace it with a complete copy, never a mix of both)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
