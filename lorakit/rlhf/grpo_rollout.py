"""Rollouts: num_generations sampled completions per prompt, on lorakit's own engine, in the training process.

The engine decodes with the live model (the adapter as it is at this step), so there is no weight sync and
no second copy of the model. Every completion has its own seed, a pure function of (--seed, round, index),
so a round's completions do not depend on what shares its batch and a resumed run samples what the
original would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.data.render import IGNORE_INDEX, render_conversation
from lorakit.infer.engine import Engine, SamplingParams

_MIX = 0x9E3779B97F4A7C15  # spreads consecutive (seed, round, index) triples over the 63-bit seed space


@dataclass
class SamplingSettings:
    """The sampling flags of a rollout (GrpoArgs' values)."""

    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    ignore_eos: bool = False  # run every completion to max_completion_length (benchmarks: equal work per step)


@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    prompt: int  # index into the round's prompts
    prompt_ids: list[int]
    completion_ids: list[int]  # the reply, its end-of-turn token included when it stopped on its own
    text: str  # the reply decoded without special tokens (what reward functions see)
    truncated: bool  # cut at --max_completion_length


def completion_seed(seed: int, round_index: int, index: int) -> int:
    """The sampling seed of completion `index` of round `round_index`."""
    return (seed * _MIX + round_index * 1_000_003 + index * 7919 + 1) % (1 << 63)


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (the last learned token of a rendered turn)."""
    rendered = render_conversation(tokenizer, [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"}])
    learned = [t for t in rendered.labels if t != IGNORE_INDEX]
    return learned[-1] if learned else tokenizer.eos_token_id


def generate_rollouts(engine: Engine, prompts: list[list[int]], *, num_generations: int,
                      sampling: SamplingSettings, seed: int, round_index: int, end_of_turn: int | None,
                      progress=None) -> list[Rollout]:
    """num_generations completions of each prompt, in prompt order (a prompt's group is adjacent).

    A completion that stopped on a stop token gets the template's end-of-turn id appended, so the policy
    learns where to stop (as TRL keeps the EOS in the completion)."""
    expanded = [p for p in prompts for _ in range(num_generations)]
    params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                             repetition_penalty=sampling.repetition_penalty,
                             max_new_tokens=sampling.max_completion_length, ignore_eos=sampling.ignore_eos,
                             seed=completion_seed(seed, round_index, i)) for i in range(len(expanded))]
    engine.refresh_adapter()  # the fast decoder reads the adapter's current weights
    was_training = engine.model.training
    engine.model.eval()  # no dropout while sampling
    try:
        with torch.no_grad():
            generations = engine.generate(expanded, params, progress=progress)
    finally:
        engine.model.train(was_training)
    out = []
    for i, (prompt, gen) in enumerate(zip(expanded, generations)):
        stopped = gen.finish_reason == "stop"
        ids = list(gen.token_ids) + ([end_of_turn] if stopped and end_of_turn is not None else [])
        out.append(Rollout(prompt=i // num_generations, prompt_ids=prompt, completion_ids=ids, text=gen.text,
                           truncated=not stopped))
    return out
