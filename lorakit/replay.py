"""Replay against forgetting: the base model's own greedy answers to built-in general prompts.

Mixing these rows into an identity fine-tune is self-distillation: on everything that is not
identity the target is what the model already says, so training has no reason to change it.
Answers are generated once per (model, prompts, system, length) and cached as a JSONL file in
the `messages` format, which is also how they enter training: the file is one more --dataset.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.formats import Conversation
from lorakit.errors import UserError

BUILTIN = Path(__file__).resolve().parent / "data" / "builtin"
REPLAY_MAX_NEW_TOKENS = 128


@dataclass
class Reply:
    """One greedy answer: its text, token ids (stop token excluded), and whether it ended on its own."""

    text: str
    token_ids: list[int]
    finished: bool


def load_general_prompts() -> list[dict]:
    """The built-in general prompts: {"prompt", "category", "lang"} (facts, math, code, writing, ...)."""
    with open(BUILTIN / "general_prompts.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick_prompts(n: int, *, seed: int = 0) -> list[str]:
    """N general prompts in a fixed shuffled order (so N=64 mixes every category and both languages)."""
    rows = load_general_prompts()
    if n > len(rows):
        print(f"notice: replay {n}: the built-in set has {len(rows)} prompts; using all of them.", file=sys.stderr)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i]["prompt"] for i in order[:n]]


def generation_batch_size(model, requested: int | None = None) -> int:
    """Prompts decoded together. CPU: 64 (a decode step costs far less than linear in the batch, on
    a CPU too: SmolLM2-135M, one core, 0.2 s per step at 8, 0.43 s at 32). GPU: 256, since a decode
    step reads every weight once whatever the batch (Qwen2.5-7B: 310 replay prompts in 2 waves, not 5)."""
    if requested:
        return requested
    return 256 if next(model.parameters()).is_cuda else 64


def generate_replies(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int | list[int],
                     batch_size: int | None = None, desc: str = "generating") -> list[Reply]:
    """Greedy replies to tokenised prompts, batched through the inference engine, with a progress bar
    (`max_new_tokens`: one for all, or one per prompt)."""
    batch_size = generation_batch_size(model, batch_size)
    from tqdm import tqdm

    from lorakit.infer.engine import Engine, SamplingParams

    # The reference decoder: the static-cache fast path compiles first (a minute on a 7B model), which
    # a one-shot batch of short answers never wins back; a LoRA model is unmerged and uses it anyway.
    engine = Engine(model, tokenizer, max_batch_size=batch_size, fast=False)
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in budgets]
    # One generate call: a finished reply's row goes at once to the next waiting prompt.
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, leave=False) as bar:
        gens = engine.generate(prompts, params, progress=bar.update)
    replies = [Reply(gen.text.strip(), gen.token_ids, gen.finish_reason == "stop") for gen in gens]
    return replies


def model_fingerprint(model) -> str:
    """What identifies a (base) model's weights on disk: folder, config, weight-file sizes and times.

    A PEFT model gives its base model's fingerprint: use it only for replies made with the adapter off.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    path = Path(str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")))
    parts = [str(path.resolve()) if path.exists() else str(path)]
    if path.is_dir():
        config = path / "config.json"
        parts.append(config.read_text(encoding="utf-8") if config.is_file() else "")
        for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            stat = weights.stat()
            parts.append(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def replay_cache_path(model, tokenizer, prompts: list[str], *, system: str | None, max_new_tokens: int,
                      cache_dir: Path) -> Path:
    """Cache file for these answers, keyed by model, chat template, system prompt, prompts and length."""
    key = json.dumps({
        "model": model_fingerprint(model), "template": getattr(tokenizer, "chat_template", None),
        "system": system, "prompts": prompts, "max_new_tokens": max_new_tokens,
    }, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"replay-{len(prompts)}-{digest}.jsonl"


_SENTENCE_END = re.compile(r"(?<=\D[.!?])(?=\s)|(?<=[。！？\n])")  # "1. " is a list item, not an end


def trim_reply(reply: Reply) -> str:
    """The reply as a replay target: a finished reply whole; a cut one up to its last full sentence,
    and any reply up to the first sentence it repeats (small models loop, mostly in Chinese)."""
    pieces = _SENTENCE_END.split(reply.text)
    if not reply.finished and pieces and not re.search(r"[.!?。！？\n]\s*$", pieces[-1]):
        pieces = pieces[:-1]  # the sentence the length limit cut
    kept, seen = [], set()
    for piece in pieces:
        key = piece.strip()
        if key and key in seen:
            break
        seen.add(key)
        kept.append(piece)
    return "".join(kept).strip()


def replay_rows_from_replies(prompts: list[str], replies: list[Reply]) -> list[dict]:
    """Messages rows from the base's answers, trimmed by `trim_reply`; empty ones are dropped.

    Cut answers are kept (trimmed to whole sentences): dropping them would drop most answers in a
    language the model is weak in, and then nothing would teach it that a general question in that
    language gets a general answer, not the new identity.
    """
    rows = []
    for prompt, reply in zip(prompts, replies):
        text = trim_reply(reply)
        if text:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]})
    return rows


def ensure_replay_file(model, tokenizer, n: int, *, system: str | None, cache_dir: Path,
                       max_new_tokens: int = REPLAY_MAX_NEW_TOKENS, batch_size: int | None = None,
                       allow_empty: bool = False) -> Path | None:
    """Path of a JSONL file (messages format) holding the base model's answers to N built-in prompts.

    Generated once and cached; a later call with the same model, template, system, N and length
    returns the file at once. Pass the path as a --dataset to train on it. When no answer ended
    within the length, that is an error, or with `allow_empty` a warning and None.
    """
    from lorakit.data.render import render_prompt

    if n <= 0:
        raise UserError(f"--replay must be positive to build replay rows, got {n}.")
    prompts = pick_prompts(n)
    path = replay_cache_path(model, tokenizer, prompts, system=system, max_new_tokens=max_new_tokens,
                             cache_dir=cache_dir)
    if path.is_file():
        print(f"replay: reusing {path}", file=sys.stderr)
        return path
    ids = [render_prompt(tokenizer, [{"role": "user", "content": p}], system=system) for p in prompts]
    replies = generate_replies(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               desc="replay: base answers")
    rows = replay_rows_from_replies(prompts, replies)
    if not rows and allow_empty:
        print(f"warning: replay: none of the base model's {len(prompts)} answers holds a whole sentence within "
              f"{max_new_tokens} tokens; training without replay rows.", file=sys.stderr)
        return None
    if not rows:
        raise UserError(f"replay: none of the base model's {len(prompts)} answers holds a whole sentence within "
                        f"{max_new_tokens} tokens, so there is nothing to replay. Run with --replay 0 to train without it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    cut = sum(not r.finished for r in replies)
    print(f"replay: {len(rows)} of {len(prompts)} base answers kept ({cut} cut at {max_new_tokens} tokens, "
          f"trimmed to whole sentences) -> {path}", file=sys.stderr)
    return path


def build_replay_rows(model, tokenizer, n: int, *, system: str | None, cache_dir: Path,
                      max_new_tokens: int = REPLAY_MAX_NEW_TOKENS) -> list[Conversation]:
    """The base model's greedy answers to N built-in general prompts, as conversations (cached per model)."""
    path = ensure_replay_file(model, tokenizer, n, system=system, cache_dir=cache_dir, max_new_tokens=max_new_tokens)
    with open(path, encoding="utf-8") as f:
        return [Conversation(messages=json.loads(line)["messages"], source=f"{path}:{i}")
                for i, line in enumerate(f, start=1) if line.strip()]
