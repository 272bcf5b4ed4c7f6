"""Greedy replies to many tokenised prompts at once (the eval's answers, replay's base answers).

`generate_replies` always returns the engine's `Generation`s; `Reply` is the small, JSON-cacheable
record eval keeps of one (text stripped, token ids, whether it ended on its own).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from lorakit.infer.engine import Engine, Generation, SamplingParams


@dataclass
class Reply:
    """One greedy answer: its text, token ids (stop token excluded), and whether it ended on its own."""

    text: str
    token_ids: list[int]
    finished: bool

    @classmethod
    def from_generation(cls, gen: Generation) -> Reply:
        return cls(gen.text.strip(), gen.token_ids, gen.finish_reason == "stop")


def generation_batch_size(model, requested: int | None = None) -> int:
    """Prompts decoded together. CPU: 128 (bench/decode_cpu.py, SmolLM2-135M float32, 2 cores, 300
    prompts x 32 new tokens: 70 s at 64, 58 s at 128, 53-61 s at 192, 54-62 s at 300; a decode step
    costs 4.9 ms per row at 64, 3.3 at 128, 2.6 at 300, but larger batches gained little end to end
    and were erratic on a shared CPU). GPU: 256, since a decode step reads every weight once whatever
    the batch (Qwen2.5-7B: 310 replay prompts in 2 waves, not 5)."""
    if requested:
        return requested
    return 256 if next(model.parameters()).is_cuda else 128


def generate_replies(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int | list[int],
                     batch_size: int | None = None, desc: str = "generating", logprobs: int = 0) -> list[Generation]:
    """Greedy generations for tokenised prompts, batched through the inference engine, with a progress bar
    (`max_new_tokens`: one for all, or one per prompt; `logprobs` = k: each step's top-k log-probabilities)."""
    batch_size = generation_batch_size(model, batch_size)
    # The reference decoder: the static-cache fast path compiles first (a minute on a 7B model), which
    # a one-shot batch of short answers never wins back; a LoRA model is unmerged and uses it anyway.
    engine = Engine(model, tokenizer, max_batch_size=batch_size, fast=False)
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, logprobs=logprobs) for n in budgets]
    # One generate call: a finished reply's row goes at once to the next waiting prompt.
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, leave=False) as bar:
        return engine.generate(prompts, params, progress=bar.update)


def greedy_replies(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                   batch_size: int | None = None, desc: str = "generating") -> list[Reply]:
    """`generate_replies` kept as Replies (what eval scores and caches)."""
    return [Reply.from_generation(g) for g in generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                               batch_size=batch_size, desc=desc)]
