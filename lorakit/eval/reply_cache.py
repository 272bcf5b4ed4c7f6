"""A base model's greedy replies kept on disk, one file per (model weights, chat template, system
prompt, reply length), so a later eval of the same base asks the model only the new questions."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lorakit.data.cache import write_text_atomic
from lorakit.replay import Reply, model_fingerprint


class ReplyCache:
    """The cached replies of one base model under one template, system prompt and reply length."""

    def __init__(self, cache_dir: Path, model, tokenizer: PreTrainedTokenizerBase, *, system: str | None,
                 max_new_tokens: int):
        key = json.dumps({"model": model_fingerprint(model), "template": getattr(tokenizer, "chat_template", None),
                          "system": system, "max_new_tokens": max_new_tokens}, sort_keys=True)
        self.path = Path(cache_dir) / f"base-replies-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        self.known: dict[str, Reply] = {}
        if self.path.is_file():
            self.known = {q: Reply(**r) for q, r in json.loads(self.path.read_text(encoding="utf-8")).items()}

    def missing(self, questions: list[str]) -> list[str]:
        """The questions not asked before, each once, in order."""
        return [q for q in dict.fromkeys(questions) if q not in self.known]

    def add(self, questions: list[str], replies: list[Reply]) -> None:
        """Remember these replies and rewrite the file (atomically)."""
        self.known.update(zip(questions, replies))
        write_text_atomic(self.path, json.dumps({q: asdict(r) for q, r in self.known.items()}, ensure_ascii=False))

    def replies(self, questions: list[str]) -> list[Reply]:
        return [self.known[q] for q in questions]
