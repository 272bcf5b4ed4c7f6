"""Sampling: the per-request settings and the pick of the next token from the logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import UserError
from lorakit.infer.decoder import Batch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    "0 means greedy (argmax), exactly reproducible."
    top_p: float = 1.0
    "Keep the smallest set of tokens whose probability reaches top_p."
    top_k: int = 0
    "Keep the k most likely tokens (0: all)."
    repetition_penalty: float = 1.0
    "HF-style penalty on every token already in the prompt or the reply (> 1 discourages)."
    max_new_tokens: int = 512
    "Most tokens generated per sequence."
    seed: int | None = None
    "Seed for sampling; None draws a fresh one."
    stop_token_ids: tuple[int, ...] = ()
    "Extra stop tokens, on top of EOS and the template's end-of-turn tokens."
    logprobs: int = 0
    "Return the k most likely tokens and their log-probabilities at every step (0: none); raw model distribution."
    ignore_eos: bool = False
    "Do not stop at EOS or the template's end-of-turn tokens (only stop_token_ids and the budget end it); vLLM's name."

    def __post_init__(self):
        if self.temperature < 0 or self.max_new_tokens <= 0 or not 0 < self.top_p <= 1 or self.logprobs < 0:
            raise UserError(
                f"Bad sampling parameters: temperature {self.temperature} (>= 0), "
                f"max_new_tokens {self.max_new_tokens} (> 0), top_p {self.top_p} (in (0, 1])."
            )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """HF's rule: divide positive logits of seen tokens by `penalty` (a number, or [B, 1] per row),
    multiply negative ones."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (the most likely token always survives)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reached top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row from float32 logits [B, V] with each row's own parameters.

    Greedy rows take the argmax. A sampling row draws from its own generator, so a seeded request gets
    the same reply whatever else shares its batch. The same picks as `sample_tokens_reference`
    (torch.multinomial per row), in a few batched kernels: multinomial draws one sample as
    argmax(p / q) with q ~ Exp(1) from the generator, so each row fills its own row of q from its
    generator and the rest runs once for rows that share temperature, top-k and top-p. No host sync
    per row (multinomial makes two), which kept a GPU decoding 64 rows waiting on the host."""
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    noise = torch.empty((len(sampled), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for j, i in enumerate(sampled):
        noise[j].exponential_(1, generator=generators[i])
        p = params[i]
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(j)
    if len(sampled) == len(params) and len(groups) == 1:
        (temperature, top_k, top_p), = groups
        probs = filter_top_k_top_p(logits / temperature, top_k, top_p).softmax(-1)
    else:
        probs = torch.empty_like(noise)
        for (temperature, top_k, top_p), rows in groups.items():
            index = torch.tensor([sampled[j] for j in rows], device=logits.device)
            probs[rows] = filter_top_k_top_p(logits.index_select(0, index) / temperature, top_k, top_p).softmax(-1)
    if bool(probs.isnan().any()):  # NaN or +inf logits (multinomial refuses them too)
        raise ValueError("Sampling: the model's next-token logits contain NaN or inf; the weights or the "
                         "inputs are broken (a diverged training run?).")
    picked = (probs / noise).argmax(-1)
    if len(sampled) == len(params):
        return picked
    return tokens.index_copy_(0, torch.tensor(sampled, device=logits.device), picked)


def sample_tokens_reference(logits: torch.Tensor, params: list[SamplingParams],
                            generators: list[torch.Generator | None]) -> torch.Tensor:
    """sample_tokens one row at a time with torch.multinomial: the plain computation the tests compare with."""
    tokens = logits.argmax(-1)
    for i, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            row = filter_top_k_top_p(logits[i:i + 1] / p.temperature, p.top_k, p.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=generator)[0, 0]
    return tokens


def seen_tokens(batch: Batch, vocab: int) -> torch.Tensor:
    """[B, V] bool: which tokens each prompt contains (padding excluded)."""
    ids = torch.where(batch.attention_mask.bool(), batch.input_ids, batch.input_ids[:, -1:])
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)
