"""The replay anchor of preference training: a KL term to the starting policy on its own general answers.

A preference set teaches a difference between two answers; nothing in it says how to answer everything
else, and the preference gradient moves shared weights. On the habit set (examples/rlhf) every type learned
the habit but lost 5-6 of the 44 general questions the base answered (docs/rlhf.md). The anchor is what
`lorakit sft --replay` does against forgetting, as a KL term: the starting policy (the reference: the base
model, or the --adapters SFT adapter) answers ANCHOR_PROMPTS built-in general prompts greedily once, its
top-k next-token distribution is kept at every answer position, and each training step adds

    replay_kl x weighted mean over the answer positions of  KL(reference || policy)  (top-k + the rest)

for one of those answers per ANCHOR_EVERY_PAIRS preference pairs (weighted as many), the answer's first token
weighted ANCHOR_FIRST_TOKEN_WEIGHT and every later one 1. The prompts (data/builtin/anchor_prompts.jsonl) are their
own set: not the eval's retention questions (they stay held out) and not general_prompts.jsonl (the habit
example's prompts come from there, and an anchor on a held-out prompt would hold its answer in place).
The answers are cached on disk per (model, starting adapter, template, system, prompts, length).
On by default for dpo (--replay_kl 3), orpo, simpo, cpo and kto (1; simpo, cpo and kto at lr 1e-4), where it kept
40 of 44 general answers with the habit learned on two seeds (docs/rlhf.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lorakit.data.render import IGNORE_INDEX, Rendered, render_prompt
from lorakit.loss import _causal_lm_parts, hidden_states, shift_targets, shift_teacher
from lorakit.paths import BUILTIN_DIR
from lorakit.replay import (
    REPLAY_TOP_K,
    ReplayAnswer,
    answer_from_generation,
    generate_replies,
    read_answers,
    replay_cache_path,
    write_answers,
)

ANCHOR_MAX_NEW_TOKENS = 24  # the opening of an answer is where a short answer is right or wrong (16: fewer kept)
# The weight of the answer's first token against 1 for every later one. It is where a preference on style lives (an
# opening phrase, a greeting): held fully it fought the preference (habit set: the habit in 71% of held-out dpo
# answers and 39% of orpo's, against 97% without an anchor); at 0.2 dpo and orpo lost habit and retention against
# 0 (docs/rlhf.md). So it is left free; every later position is conditioned on the reference's own opening.
ANCHOR_FIRST_TOKEN_WEIGHT = 0.0
# One anchor answer per this many preference pairs (weighted as many times): half the extra forwards (3, with 16
# tokens: fewer questions kept)
ANCHOR_EVERY_PAIRS = 2


def load_anchor_prompts() -> list[str]:
    """The built-in anchor prompts (English and Chinese; facts, math, code, advice, writing, translation)."""
    with open(BUILTIN_DIR / "anchor_prompts.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def adapter_key(adapter: Path | None) -> str:
    """What identifies the starting adapter's weights ('' for a fresh LoRA: the base alone answers)."""
    if adapter is None:
        return ""
    files = sorted(Path(adapter).glob("adapter_model.*"))
    parts = [str(Path(adapter).resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


@torch.no_grad()
def anchor_answers(model, tokenizer, *, system: str | None, cache_dir: Path, adapter: Path | None = None,
                   max_new_tokens: int = ANCHOR_MAX_NEW_TOKENS, top_k: int = REPLAY_TOP_K,
                   log=print) -> list[ReplayAnswer]:
    """The model's greedy answers to the anchor prompts with their top-k distributions, cached on disk.

    `model` must be the starting policy (a fresh LoRA adds zero; else the loaded SFT adapter as it starts)."""
    prompts = load_anchor_prompts()
    folder = Path(cache_dir) / (f"start-{adapter_key(adapter)}" if adapter is not None else "")
    path = replay_cache_path(model, tokenizer, prompts, system=system, max_new_tokens=max_new_tokens,
                             cache_dir=folder, top_k=top_k)
    if path.is_file():
        log(f"replay anchor: reusing {path}")
        return read_answers(path)
    was_training = model.training
    model.eval()
    try:
        ids = [render_prompt(tokenizer, [{"role": "user", "content": p}], system=system) for p in prompts]
        gens = generate_replies(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                desc="replay anchor: starting policy's answers", logprobs=top_k)
    finally:
        model.train(was_training)
    answers = [answer_from_generation(p, i, g, system) for p, i, g in zip(prompts, ids, gens)]
    write_answers(path, answers)
    log(f"replay anchor: {len(answers)} answers of the starting policy -> {path}")
    return answers


def anchor_samples(answers: list[ReplayAnswer]) -> list[Rendered]:
    """Prompt + answer; each answer position's target is the reference's top-k probabilities as they are (summing
    to under 1: kl_to_teacher gives the rest of the vocabulary the remaining mass). How much the first answer
    token counts is anchor_kl's `first_weight`."""
    out = []
    for a in answers:
        start = len(a.prompt_ids)
        teacher = {start + j: (list(ids), list(probs)) for j, (ids, probs) in enumerate(zip(a.top_ids, a.top_probs))}
        out.append(Rendered(input_ids=a.prompt_ids + a.answer_ids, labels=[IGNORE_INDEX] * start + a.answer_ids,
                            teacher=teacher))
    return out


def kl_to_teacher(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """[N] KL(teacher || policy) over the teacher's top-k tokens plus one bucket for every other token.

    logits [N, V] (computed in fp32 or wider); ids [N, K]; probs [N, K]: the teacher's probabilities of
    those tokens (0 on padding entries), summing to at most 1; the bucket holds 1 - sum(probs) for the
    teacher and the policy's mass outside ids. Zero when the policy is the teacher, so it only pulls back
    (a KL on the top-k renormalised would also sharpen the policy onto them)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = probs.to(logits.dtype)
    logz = torch.logsumexp(logits, dim=-1)
    logq = logits.gather(1, ids) - logz.unsqueeze(1)
    listed = torch.zeros_like(logits).scatter_add_(1, ids, (p > 0).to(logits.dtype)) > 0
    logq_rest = torch.logsumexp(logits.masked_fill(listed, float("-inf")), dim=-1) - logz
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    rest = torch.where(p_rest > 0, torch.xlogy(p_rest, p_rest) - p_rest * logq_rest, torch.zeros_like(p_rest))
    return (torch.xlogy(p, p) - p * logq).sum(-1) + rest


def anchor_kl(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
              first_weight: float = ANCHOR_FIRST_TOKEN_WEIGHT, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """[A] per anchor row: the weighted mean over its held answer positions of kl_to_teacher, the first of them
    weighted `first_weight` and every other 1 (batch: data.anchor_rows; hidden: the rows' final hidden states
    when the batch's forward made them)."""
    if hidden is None:
        hidden = hidden_states(model, batch)
    _, head = _causal_lm_parts(model)
    targets = shift_targets(batch["labels"])
    teacher_ids, teacher_probs = shift_teacher(batch)
    mask = (targets != IGNORE_INDEX) & (teacher_probs.sum(-1) > 0)
    weights = torch.where(mask.cumsum(-1) == 1, first_weight, 1.0) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    kl = kl_to_teacher(head(hidden[rows, cols]), teacher_ids[rows, cols], teacher_probs[rows, cols])
    w = weights[rows, cols].to(kl.dtype)
    per_row = torch.zeros(mask.shape[0], dtype=kl.dtype, device=kl.device).index_add(0, rows, kl * w)
    return per_row / weights.sum(-1).to(kl.dtype).clamp(min=1e-6)


def describe_anchor(answers: list[ReplayAnswer], weight: float) -> str:
    """One line for the run's log: how many answers, their tokens, and the weight."""
    tokens = sum(len(a.answer_ids) for a in answers)
    return (f"replay anchor: KL to the starting policy on its own answers to {len(answers)} built-in general prompts "
            f"({tokens} answer tokens), weight --replay_kl {weight} (0 turns it off)")
