"""The reference decoder: the model's own forward over a transformers cache, for any architecture
on any device. The fast decoder (`fast_decode.StaticDecoder`) is tested against it."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from lorakit.infer.decoder import Batch
from lorakit.infer.kv_buffers import KVBuffers, plain_dynamic
from lorakit.kv_cache import cache_of, with_cache

MIN_SHARED_PREFIX = 8  # prompts sharing fewer first tokens are each prefilled whole


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front of `x` along `dim` up to `width`."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _similar_lengths(batch: Batch, waste: float = 0.25) -> list[Batch]:
    """The batch cut into runs of consecutive rows whose padding is at most `waste` of a run's tokens."""
    lengths = [batch.input_ids.shape[1] - pad for pad in batch.pad_lengths]
    parts, begin = [], 0
    for end in range(1, len(lengths) + 1):
        run = lengths[begin:end + 1]
        if end == len(lengths) or max(run) * len(run) - sum(run) > waste * max(run) * len(run):
            cut = min(batch.pad_lengths[begin:end])
            parts.append(Batch(batch.input_ids[begin:end, cut:], batch.attention_mask[begin:end, cut:],
                               [pad - cut for pad in batch.pad_lengths[begin:end]]))
            begin = end
    return parts


def _common_prefix_length(rows: list[list[int]]) -> int:
    first = rows[0]
    for i in range(min(map(len, rows))):
        if any(row[i] != first[i] for row in rows):
            return i
    return min(map(len, rows))


class ReferenceDecoder:
    """The model's own forward over a transformers cache (any architecture, any device).

    Default (`in_place`): the keys and values live in `KVBuffers`, pre-allocated for the prompt
    width plus the longest reply budget, and each step writes its column in place (a
    `DynamicCache` copies the whole cache with torch.cat every step in every layer). New rows are
    prefilled as a batch of their own and copied into free slots; leaving rows free their slots.
    The prompts' common prefix (a chat template's system prompt: 24 of SmolLM2's ~44 prompt tokens)
    is prefilled once and kept: new rows prefill only the tokens after it.
    A model whose prefill cache is not plain full-attention `DynamicLayer`s (sliding windows),
    or `in_place=False`, takes the `DynamicCache` path: new rows' cache is concatenated to the
    running one on the batch axis, the narrower of the two left-padded (attention mask 0 there,
    positions per row); leaving rows are dropped with index_select, and leading columns that are
    padding in every remaining row are cut. A cache with other layers than plain `DynamicLayer`s
    cannot be merged: such a model takes new rows only when the batch is empty.
    """

    def __init__(self, model, *, in_place: bool = True):
        self.model, self.in_place = model, in_place
        self.reset(0, None)

    def reset(self, rows: int, length: int | None) -> None:
        self.hint = (rows, length)  # row capacity and tokens per row expected (for the in-place buffers)
        self.buffers: KVBuffers | None = None  # the in-place path
        self.cache = None  # the DynamicCache path
        self.mask = None  # [B, W] long, 0 on padding
        self.positions = None  # [B, 1] long: the rotary position of the next token
        self.pads: list[int] = []  # leading padding columns per row
        self.prefix: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # see _shared_prefix

    @property
    def can_join(self) -> bool:
        if self.buffers is not None or self.cache is None:
            return True
        return all(type(layer).__name__ == "DynamicLayer" for layer in self.cache.layers)

    def prefill(self, batch: Batch, max_new_tokens: int) -> torch.Tensor:
        """Start over with `batch` as the only rows."""
        self.reset(len(batch.input_ids), None)
        return self.add(batch, max_new_tokens)

    @torch.inference_mode()
    def add(self, batch: Batch, max_new_tokens: int) -> torch.Tensor:
        shared = self._shared_prefix(batch) if self.in_place and self.cache is None else None
        if shared is not None or self.buffers is not None:
            # Rows of similar length are prefilled together: less padding (generate adds them sorted).
            return torch.cat([self._join(part, shared, max_new_tokens) for part in _similar_lengths(batch)])
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache, pads = cache_of(out), list(batch.pad_lengths)
        if self.in_place and self.cache is None and plain_dynamic(cache):
            self._to_buffers([(layer.keys, layer.values) for layer in cache.layers], pads, max_new_tokens)
        elif self.cache is None:
            self.cache, self.mask, self.positions, self.pads = cache, mask, positions[:, -1:], pads
        else:
            self._merge(cache, mask, positions[:, -1:], pads)
        return out.logits[:, -1].float()

    def _join(self, batch: Batch, shared, max_new_tokens: int) -> torch.Tensor:
        """Prefill `batch` (after the shared prefix, if any) into the buffers; return its last logits."""
        if shared is not None:
            logits, kv, pads = self._prefill_after_prefix(batch, *shared)
        else:
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=positions, use_cache=True, logits_to_keep=1)
            logits, pads = out.logits[:, -1], list(batch.pad_lengths)
            kv = [(layer.keys, layer.values) for layer in cache_of(out).layers]
        self._to_buffers(kv, pads, max_new_tokens)
        return logits.float()

    def _to_buffers(self, kv: list[tuple[torch.Tensor, torch.Tensor]], pads: list[int], max_new_tokens: int) -> None:
        if self.buffers is None:
            rows, length = self.hint
            self.buffers = KVBuffers(kv, max(rows, len(pads)), max(length or 0, kv[0][0].shape[2] + max_new_tokens))
        self.buffers.join(kv, pads, max_new_tokens)

    def _shared_prefix(self, batch: Batch) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The new prompts' common prefix (all but their last token at most): its length and each layer's keys
        and values [1, heads, length, dim]. The last prefix is kept and reused while it matches at least
        MIN_SHARED_PREFIX tokens (a chat template's system prompt); a new one is prefilled for two rows or more."""
        prompts = [row[pad:] for row, pad in zip(batch.input_ids.tolist(), batch.pad_lengths)]
        length = min(_common_prefix_length(prompts), min(map(len, prompts)) - 1)
        if self.prefix is not None:
            tokens, kv = self.prefix
            reuse = _common_prefix_length([tokens, prompts[0][:length]])
            if reuse >= MIN_SHARED_PREFIX:
                return reuse, [(keys[:, :, :reuse], values[:, :, :reuse]) for keys, values in kv]
        if length < MIN_SHARED_PREFIX or len(prompts) < 2:
            return None
        ids = torch.tensor([prompts[0][:length]], device=batch.input_ids.device)
        cache = cache_of(self.model(input_ids=ids, use_cache=True, logits_to_keep=1))
        if not plain_dynamic(cache):
            self.in_place = False  # sliding windows and the like: the DynamicCache path from now on
            return None
        self.prefix = (prompts[0][:length], [(layer.keys, layer.values) for layer in cache.layers])
        return length, self.prefix[1]

    def _prefill_after_prefix(self, batch: Batch, shared: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
        """Prefill only the prompts' tokens after their `shared` common ones, attending to the prefix's cache.

        Returns the last logits, each layer's keys and values laid out as a left-padded prefill of the
        whole prompts would leave them (width `shared` + the longest rest), and each row's padding."""
        rows, width = batch.input_ids.shape
        low = min(batch.pad_lengths)
        device = batch.input_ids.device
        pads = torch.tensor(batch.pad_lengths, device=device)[:, None]
        rest = (torch.arange(low + shared, width, device=device) >= pads + shared).long()  # [rows, S]: a row's own
        past = DynamicCache()
        for i, (keys, values) in enumerate(prefix):
            past.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), i)
        out = self.model(input_ids=batch.input_ids[:, low + shared:], **with_cache(past), use_cache=True,
                         attention_mask=torch.cat([rest.new_ones(rows, shared), rest], dim=1),
                         position_ids=shared + rest.cumsum(-1) - 1, logits_to_keep=1)
        # A row's tokens sit in columns [0, shared) and [shared + pad - low, end): move its prefix next to its rest.
        columns = torch.arange(shared + rest.shape[1], device=device)[None, :]
        shift = pads - low
        index = torch.where((columns >= shift) & (columns < shift + shared), columns - shift, columns)
        kv = []
        for layer in cache_of(out).layers:
            kv.append(tuple(x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
                            for x in (layer.keys, layer.values)))
        return out.logits[:, -1], kv, shift[:, 0].tolist()

    def _merge(self, cache, mask, positions, pads: list[int]) -> None:
        old_width, new_width = self.mask.shape[1], mask.shape[1]
        width = max(old_width, new_width)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.pads = [p + width - old_width for p in self.pads] + [p + width - new_width for p in pads]

    @torch.inference_mode()  # the buffers are written in place, also when a caller drops a row outside it
    def keep(self, rows: list[int]) -> None:
        if self.buffers is not None:
            return self.buffers.keep(rows)
        if not rows:
            return self.reset(*self.hint)
        index = torch.tensor(rows, device=self.mask.device)
        self.pads = [self.pads[i] for i in rows]
        cut = min(self.pads) if self.can_join else 0  # columns that are padding in every kept row
        self.pads = [p - cut for p in self.pads]
        self.mask = self.mask.index_select(0, index)[:, cut:]
        self.positions = self.positions.index_select(0, index)
        if self.can_join:
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
                layer.values = layer.values.index_select(0, index)[:, :, cut:]
        else:
            self.cache.batch_select_indices(index)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.buffers is not None:
            ids, mask, positions = self.buffers.step_inputs(tokens)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             **with_cache(self.buffers.cache), use_cache=True)
            return self.buffers.step_done(out.logits[:, -1].float())
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                         **with_cache(self.cache), use_cache=True)
        self.cache = cache_of(out)
        return out.logits[:, -1].float()
