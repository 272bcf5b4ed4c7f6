"""A live (unmerged) LoRA adapter as the fast decoder reads it: GRPO samples rollouts from the policy it trains.

The decode step computes y = x W^T + ((x A^T) B^T) s for every adapted projection, with the base W read
where it is (no merged copy of the model). Projections that share an input are grouped: q/k/v (and
gate/up) stack their A matrices into one [sum r, in] and place s B block-diagonally in one
[sum out, sum r], so a group costs two small GEMMs per step. The stacked tensors are fixed buffers (a
CUDA graph records their addresses); `refresh()` copies the adapter's current values into them in place,
once per rollout round, so the graph sees each optimizer step's weights without a re-capture.
"""

from __future__ import annotations

import torch


def is_plain_lora(module) -> bool:
    """A PEFT LoRA Linear over an nn.Linear with one active adapter and no DoRA (what the decode step adds)."""
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "active_adapters")):
        return False
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if len(adapters) != 1 or type(module.base_layer) is not torch.nn.Linear:
        return False
    return not getattr(module, "use_dora", {}).get(adapters[0], False)


def base_linear(module) -> torch.nn.Linear:
    """The plain Linear a projection computes with (under a LoRA wrapper, its base layer)."""
    return module.base_layer if hasattr(module, "base_layer") else module


def _adapters(projections: list) -> list[tuple]:
    """(module, active adapter name) of each projection that is a plain LoRA layer."""
    return [(m, next(a for a in m.active_adapters if a in m.lora_A)) for m in projections if is_plain_lora(m)]


class LoraGroup:
    """The adapters of projections that read the same input, stacked: x -> x A^T B^T (all outputs concatenated)."""

    def __init__(self, projections: list, dtype: torch.dtype, a_rows: torch.Tensor | None = None):
        """a_rows: where the stacked A lives ([rank_of(projections), in], e.g. rows under a stacked base weight,
        so one product gives both); a buffer of its own when None."""
        self.projections = projections
        self.parts = []  # (module, adapter name, row offset in A, column offset in B output) per adapted projection
        ranks, out = 0, 0
        adapted = dict(_adapters(projections))
        for m in projections:
            if m in adapted:
                self.parts.append((m, adapted[m], ranks, out))
                ranks += m.lora_A[adapted[m]].weight.shape[0]
            out += base_linear(m).out_features
        ref = base_linear(projections[0]).weight
        self.a = torch.zeros(ranks, ref.shape[1], dtype=dtype, device=ref.device) if a_rows is None else a_rows
        self.b = torch.zeros(out, ranks, dtype=dtype, device=ref.device)
        self.refresh()

    @staticmethod
    def rank_of(projections: list) -> int:
        """Rows of the stacked A: the adapted projections' ranks summed."""
        return sum(m.lora_A[name].weight.shape[0] for m, name in _adapters(projections))

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the adapters' current A and s B into the stacked buffers (in place)."""
        for m, name, row, col in self.parts:
            a, b = m.lora_A[name].weight, m.lora_B[name].weight
            r, o = a.shape[0], b.shape[0]
            self.a[row:row + r].copy_(a)
            self.b[col:col + o, row:row + r].copy_(b * m.scaling[name])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.a, self.b) if self.parts else None


def add_lora(y: torch.Tensor, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """y + (x A^T) B^T, or y when there is no adapter."""
    if lora is None:
        return y
    return y + torch.nn.functional.linear(torch.nn.functional.linear(x, lora[0]), lora[1])
