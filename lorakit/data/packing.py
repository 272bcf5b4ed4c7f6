"""Pack rendered samples into max_length rows, and collate samples into padded tensors.

A packed row concatenates whole samples; its position_ids restart at 0 for each sample. With no
2-D attention_mask, transformers (masking_utils.find_packed_sequence_indices) reads those restarts
and builds a block-diagonal causal mask, so no token attends across samples. The model must be
called with use_cache=False: with a KV cache present transformers skips that detection.
Each sample's first label is set to -100 so the previous sample's last token never predicts it;
that label is never used unpacked either (targets are labels shifted by one), so the packed loss
equals the unpacked loss. A sample's loss_scale goes with its tokens (collate: loss_scale [B, T]).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from lorakit.data.render import IGNORE_INDEX, Rendered


@dataclass
class Packed:
    """Several samples in one row: position_ids restart at 0 where each sample starts."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]  # length of each sample, in order
    teacher: dict[int, tuple[list[int], list[float]]] | None = None  # as Rendered.teacher, positions in the row
    loss_scales: list[float] | None = None  # each sample's Rendered.loss_scale, in order (None: all 1)


def pack_sequences(samples: list[Rendered], max_length: int) -> list[Packed]:
    """Best-fit decreasing: longest sample first, each into the fullest bin it still fits."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = len(samples[i].input_ids)
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}; truncate before packing")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
            continue
        space, b = free.pop(k)
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    return [_join([samples[i] for i in members]) for members in bins]


def _join(members: list[Rendered]) -> Packed:
    ids, labels, positions, lengths, teacher = [], [], [], [], {}
    scales = [s.loss_scale for s in members]
    for s in members:
        teacher.update({len(ids) + t: top for t, top in (s.teacher or {}).items()})
        ids += s.input_ids
        labels += [IGNORE_INDEX] + s.labels[1:]
        positions += range(len(s.input_ids))
        lengths.append(len(s.input_ids))
    return Packed(input_ids=ids, labels=labels, position_ids=positions, lengths=lengths, teacher=teacher or None,
                  loss_scales=scales if any(x != 1.0 for x in scales) else None)


def shared_prefix_length(batch: list[Rendered]) -> int:
    """Tokens every sample starts with and learns nothing from (none of them, nor the token after, has a
    label): the template's system prompt, say. 0 for a single sample or when it is too short to matter."""
    if len(batch) < 2:
        return 0
    first = batch[0].input_ids
    n = min(len(x.input_ids) for x in batch) - 1
    for x in batch:
        labelled = next((t for t, label in enumerate(x.labels) if label != IGNORE_INDEX), len(x.labels))
        n = min(n, labelled - 1)
    for t in range(max(n, 0)):
        if any(x.input_ids[t] != first[t] for x in batch[1:]):
            n = t
            break
    return n if n >= 4 else 0


def strip_prefix(sample: Rendered, n: int) -> Rendered:
    teacher = {t - n: top for t, top in sample.teacher.items()} if sample.teacher else None
    return Rendered(input_ids=sample.input_ids[n:], labels=sample.labels[n:], teacher=teacher,
                    loss_scale=sample.loss_scale)


def collate(batch: list[Rendered] | list[Packed], pad_token_id: int, *, shared_prefix: bool = False,
            width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch into int64 tensors [B, T]; T is the longest row, or `width` when that is longer.

    width (packed rows on a GPU: --max_length): every step has the same shape, so the compiled layers
    are compiled once instead of again for dynamic shapes (measured: a 70 s recompile at step 2 on the
    7B architecture); the padding is its own segment with no labels, so the loss is unchanged.

    shared_prefix (unpacked samples): the tokens all samples start with (`shared_prefix_length`) are cut
    from every row and returned once as prefix_ids [1, P]; the loss runs them once for the whole batch
    (lorakit.loss.hidden_states). Same loss and gradients, (B - 1) x P fewer tokens through the model.

    Rendered samples: input_ids, labels (-100 on padding), attention_mask (1 real, 0 padding).
    Packed rows: input_ids, labels, position_ids and no attention_mask, so the model isolates each
    sample; padding forms its own segment (positions 0..p-1) after the real tokens.
    Samples with distillation targets add teacher_ids / teacher_probs [B, T, K] (probs 0 elsewhere);
    samples with a loss_scale other than 1 add loss_scale [B, T] (fp32: each token's sample's scale).
    """
    prefix = shared_prefix_length(batch) if shared_prefix and not isinstance(batch[0], Packed) else 0
    if prefix:
        out = collate([strip_prefix(x, prefix) for x in batch], pad_token_id)
        return out | {"prefix_ids": torch.tensor([batch[0].input_ids[:prefix]], dtype=torch.long)}
    width = max([len(x.input_ids) for x in batch] + [width or 0])
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for r, x in enumerate(batch):
        input_ids[r, : len(x.input_ids)] = torch.tensor(x.input_ids, dtype=torch.long)
        labels[r, : len(x.labels)] = torch.tensor(x.labels, dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels}
    if isinstance(batch[0], Packed):
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            n = len(x.position_ids)
            position_ids[r, :n] = torch.tensor(x.position_ids, dtype=torch.long)
            position_ids[r, n:] = torch.arange(width - n)
        out["position_ids"] = position_ids
    else:
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            attention_mask[r, : len(x.input_ids)] = 1
        out["attention_mask"] = attention_mask
    if any(x.teacher for x in batch):
        out.update(collate_teacher(batch, width))
    if any(_token_scales(x) is not None for x in batch):
        out["loss_scale"] = collate_loss_scale(batch, width)
    return out


def _token_scales(x: Rendered | Packed) -> list[float] | None:
    """The loss_scale of each token of a row, or None when every one is 1."""
    if isinstance(x, Packed):
        if x.loss_scales is None:
            return None
        return [scale for scale, n in zip(x.loss_scales, x.lengths) for _ in range(n)]
    return None if x.loss_scale == 1.0 else [x.loss_scale] * len(x.input_ids)


def collate_loss_scale(batch: list[Rendered] | list[Packed], width: int) -> torch.Tensor:
    """loss_scale (fp32) [B, T]: each token's sample's loss_scale, unshifted like labels; 1 on padding."""
    scale = torch.ones((len(batch), width), dtype=torch.float32)
    for r, x in enumerate(batch):
        token_scales = _token_scales(x)
        if token_scales is not None:
            scale[r, : len(token_scales)] = torch.tensor(token_scales, dtype=torch.float32)
    return scale


def collate_teacher(batch: list[Rendered] | list[Packed], width: int) -> dict[str, torch.Tensor]:
    """teacher_ids (int64) and teacher_probs (fp32), [B, T, K]: each position's top-k, zeros where none."""
    k = max(len(ids) for x in batch for ids, _ in (x.teacher or {}).values())
    teacher_ids = torch.zeros((len(batch), width, k), dtype=torch.long)
    teacher_probs = torch.zeros((len(batch), width, k), dtype=torch.float32)
    for r, x in enumerate(batch):
        for t, (ids, probs) in (x.teacher or {}).items():
            teacher_ids[r, t, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            teacher_probs[r, t, : len(probs)] = torch.tensor(probs, dtype=torch.float32)
    return {"teacher_ids": teacher_ids, "teacher_probs": teacher_probs}
