"""The reference policy: the starting policy (the --adapters SFT adapter, or the base model), never a
second copy of the base weights.

Two ways to get its log-probabilities:
- `precompute_reference_logps`: one no-grad pass over every example BEFORE the first optimizer step,
  while the model still is the starting policy (a fresh LoRA adds zero; a loaded adapter is its
  initial self). TRL's precompute_ref_log_probs idea: training then needs no reference forward.
- `ReferencePolicy.active()`: run the model as the reference at any time (GRPO, or checks). The
  starting LoRA tensors are small, so they are kept and swapped in; that works whatever forward the
  layers use (PEFT's or lorakit.fast's fused one) and whether the adapter is fresh or loaded.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from lorakit.errors import UserError
from lorakit.rlhf.logps import token_logps


class ReferencePolicy:
    """The trainable tensors as they were when training started, to swap in on demand."""

    def __init__(self, model: torch.nn.Module):
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not any("lora_" in name for name, _ in params):
            raise UserError("an on-the-fly reference model needs --train_type lora (full fine-tuning would need a "
                            "second copy of every weight)")
        self.model = model
        self.params = [p for _, p in params]
        self.initial = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """Within the block the model computes the reference policy (no grad, eval mode); restored after."""
        was_training = self.model.training
        current = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, init in zip(self.params, self.initial):
                    p.copy_(init)
                self.model.eval()
                yield self.model
        finally:
            with torch.no_grad():
                for p, now in zip(self.params, current):
                    p.copy_(now)
            self.model.train(was_training)


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, fused: bool = True) -> torch.Tensor:
    """[R] summed log-prob of each row's labelled tokens (no grad)."""
    return token_logps(model, batch, fused=fused).sum()


def precompute_reference_logps(model: torch.nn.Module, items: list, collate: Callable, assign: Callable, *,
                               batch_size: int, device: torch.device, fused: bool = True, desc: str = "reference") -> None:
    """Fill every item's reference log-probs with one no-grad pass of `model` as it stands (eval mode).

    collate(items) -> batch dict; assign(items, batch, model) computes and stores the values (the caller
    knows which rows of a batch belong to which field: chosen/rejected halves, or KTO's KL rows).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", file=sys.stderr,
                              dynamic_ncols=True, leave=False):
                chunk = items[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                assign(chunk, batch, model)
    finally:
        model.train(was_training)
