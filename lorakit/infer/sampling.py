"""Sampling: the per-request settings and the pick of the next token from the logits."""

from __future__ import annotations

import warnings
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
    """Set logits outside the top-k / nucleus to -inf (the most likely token always survives).

    With both, the nucleus is taken among the k candidates only (sorting k values, not the vocabulary: the
    other tokens are out anyway), which is what makes GRPO's default top-k 50 + top-p 0.9 cheap per step."""
    if 0 < top_k < logits.shape[-1]:
        values, ids = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
        if top_p < 1.0:
            values = values.masked_fill(_outside_nucleus(values, top_p), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, _outside_nucleus(sorted_logits, top_p))
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _outside_nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """For logits sorted largest first: True where the mass of the tokens before already reached top_p."""
    probs = sorted_logits.softmax(-1)
    return (probs.cumsum(-1) - probs) >= top_p


# SplitMix64 (Steele, Lea and Flood 2014) on int64 tensors: additions and products wrap modulo 2**64 as they
# do in uint64, and the right shifts are made logical by masking the sign bits off.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function of the state x + golden ratio (int64 in, int64 bit pattern out)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _gumbel_noise(seeds: torch.Tensor, draws: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B, vocab] float32 Gumbel draws, a pure function of each row's (seed, draw number, token id): counter-based,
    so one batched computation serves every row and a row's draws depend on nothing else in its batch.
    steps: `stream_steps(vocab)`."""
    key = splitmix64(splitmix64(seeds) ^ draws)  # [B]: one stream per (seed, draw)
    bits = splitmix64(key[:, None] + steps[None, :])  # SplitMix64's id-th output of that stream
    return -torch.log(-torch.log(uniform_from_bits(bits)))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniform in (0, 1) from the top 23 bits of int64 bit patterns: (k + 0.5) / 2**23 is exact in float32
    and strictly inside (0, 1), so neither log(u) nor log(-log(u)) is ever infinite (with 24 bits the top value
    rounds to 1.0)."""
    return (_shift_right(bits, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


_STEPS: dict = {}


def stream_steps(vocab: int, device) -> torch.Tensor:
    """(1..vocab) x golden ratio as an int64 tensor, made once outside any compiled code: Triton computes an
    arange as int32 and refuses the 64-bit product (seen compiling the race on an H200)."""
    key = (vocab, str(device))
    if key not in _STEPS:
        _STEPS[key] = torch.arange(1, vocab + 1, dtype=torch.int64, device=device) * _GOLDEN
    return _STEPS[key]


def _race(scaled: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """argmax(scaled + Gumbel noise) per row: token t with probability softmax(scaled)_t; -1 where the row's
    best score is NaN or +inf (NaN or +inf logits)."""
    score = scaled + _gumbel_noise(seeds, draws, steps)
    pick = score.argmax(-1)  # a NaN counts as the largest, so it is caught below
    best = score.gather(-1, pick[:, None])[:, 0]
    return torch.where(torch.isfinite(best), pick, -1)


_compiled_race = None


def race(scaled: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """_race; on CUDA compiled into one kernel that reads the logits once (eagerly, a dozen passes); eager, with a
    warning, if the compiler fails."""
    global _compiled_race
    steps = stream_steps(scaled.shape[-1], scaled.device)
    if scaled.device.type != "cuda" or _compiled_race is False:
        return _race(scaled, seeds, draws, steps)
    if _compiled_race is None:
        _compiled_race = torch.compile(_race, dynamic=True)
    try:
        return _compiled_race(scaled, seeds, draws, steps)
    except Exception as exc:  # a compiler problem must not stop generation: the same picks, eagerly
        warnings.warn(f"torch.compile of the sampling step failed ({exc!r:.300}); sampling uncompiled.")
        _compiled_race = False
        return _race(scaled, seeds, draws, steps)


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], seeds: torch.Tensor,
                  draws: torch.Tensor) -> torch.Tensor:
    """Pick one token per row from float32 logits [B, V] with each row's own parameters.

    Greedy rows take the argmax. A sampling row picks argmax(l / T + g) over its filtered logits l, with
    g a Gumbel draw per token: the Gumbel-max race, which picks token t with probability softmax(l / T)_t
    (as torch.multinomial). g comes from a counter-based generator of (seed, draw number, token id)
    (seeds, draws: [B] int64; the caller counts a row's draws), so a seeded request gets the same reply
    whatever shares its batch, and the whole batch is one kernel with no host sync: per-row generators
    made two syncs and a launch per row and step, which kept a GPU decoding 64 rows waiting on the
    host. A sampling row with NaN or +inf logits gets -1: `check_picks` raises on it once the picks
    reach the host (they go there anyway)."""
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    groups: dict[tuple[float, int, float], list[int]] = {}
    for j, i in enumerate(sampled):
        p = params[i]
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(j)
    everyone = len(sampled) == len(params)
    index = None if everyone else torch.tensor(sampled, device=logits.device)
    if everyone and len(groups) == 1:
        (temperature, top_k, top_p), = groups
        scaled = filter_top_k_top_p(logits / temperature, top_k, top_p)
    else:
        scaled = torch.empty((len(sampled), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
        for (temperature, top_k, top_p), rows in groups.items():
            rows_index = torch.tensor([sampled[j] for j in rows], device=logits.device)
            scaled[rows] = filter_top_k_top_p(logits.index_select(0, rows_index) / temperature, top_k, top_p)
    row_seeds, row_draws = (seeds, draws) if everyone else (seeds.index_select(0, index), draws.index_select(0, index))
    picked = race(scaled, row_seeds, row_draws)
    if everyone:
        return picked
    return tokens.index_copy_(0, index, picked)


def check_picks(tokens: list[int]) -> None:
    """Raise on a sampling row that had no valid distribution (sample_tokens marks it -1)."""
    if any(t < 0 for t in tokens):
        raise ValueError("Sampling: the model's next-token logits contain NaN or inf; the weights or the "
                         "inputs are broken (a diverged training run? sample from an earlier checkpoint).")


def sample_tokens_reference(logits: torch.Tensor, params: list[SamplingParams], seeds: torch.Tensor,
                            draws: torch.Tensor) -> torch.Tensor:
    """sample_tokens one row at a time, nothing batched or compiled: the plain computation the tests compare with."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.temperature > 0:
            scaled = filter_top_k_top_p(logits[i:i + 1] / p.temperature, p.top_k, p.top_p)
            tokens[i] = _race(scaled, seeds[i:i + 1], draws[i:i + 1], stream_steps(logits.shape[-1], logits.device))[0]
    return tokens


def seen_tokens(batch: Batch, vocab: int) -> torch.Tensor:
    """[B, V] bool: which tokens each prompt contains (padding excluded)."""
    ids = torch.where(batch.attention_mask.bool(), batch.input_ids, batch.input_ids[:, -1:])
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)
