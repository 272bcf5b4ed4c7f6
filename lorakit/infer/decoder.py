"""The contract between the running batch and a decoder: prompts as a left-padded `Batch`, and the
`Decoder` protocol both decoders implement (`reference_decoder.ReferenceDecoder`, the model's own
forward, and `fast_decode.StaticDecoder`, the GPU fast path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Batch:
    """Left-padded prompts: every row ends at column `input_ids.shape[1] - 1`."""

    input_ids: torch.Tensor  # [B, P] long
    attention_mask: torch.Tensor  # [B, P] long, 0 on padding
    pad_lengths: list[int] = field(default_factory=list)


class Decoder(Protocol):
    """Next-token logits for a set of rows that changes between steps (rows keep their order)."""

    def reset(self, rows: int, length: int | None) -> None:
        """Start empty, with room for `rows` rows of about `length` tokens (a hint)."""

    def add(self, batch: Batch, max_new_tokens: int) -> torch.Tensor:
        """Prefill new rows (they join at the end); return their last logits [n, V] (float32)."""

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the current order), in this order."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; return the next logits [B, V] (float32)."""


def left_pad(prompts: list[list[int]], pad_id: int, device) -> Batch:
    """Stack prompts into one left-padded batch."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[pad_id] * n + p for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    return Batch(ids, mask, pads)
