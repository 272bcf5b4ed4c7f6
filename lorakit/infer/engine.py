"""Generation engine: our own decode loop over a transformers causal LM.

Prompts are token ids (made by `lorakit.data.render.render_prompt`). Sequences are decoded in a
`RunningBatch` (continuous batching): between two decode steps new prompts join (prefilled as a
left-padded batch of their own and merged in) and finished or dropped sequences leave, so a row
never waits for the longest reply. Each step feeds one token per sequence; a sequence stops on
its own at EOS, the template's end-of-turn token, a caller's stop id or its token budget, and
samples with its own parameters (greedy rows are the exact argmax).

Two decoders produce the next-token logits, and the loop, sampling and stopping around them
are shared:
- `ReferenceDecoder`: the model's own forward with a transformers `DynamicCache`. Works for any
  architecture, on any device; it is the reference the fast path is tested against.
- `lorakit.infer.fast_decode.StaticDecoder`: a pre-allocated static KV cache and a decode step
  written over the model's weights, captured in a CUDA graph (and compiled) on a GPU. Used on
  CUDA for the Llama/Qwen2 family; `tests/test_engine.py` and `tests/test_continuous.py` prove it
  picks the same greedy tokens as the reference on the CPU, and `bench/decode.py` checks it on the GPU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lorakit.errors import UserError

COMPILE_MODE = "max-autotune-no-cudagraphs"  # the fast decoder's torch.compile mode on CUDA
MIN_SHARED_PREFIX = 8  # prompts sharing fewer first tokens are each prefilled whole


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

    def __post_init__(self):
        if self.temperature < 0 or self.max_new_tokens <= 0 or not 0 < self.top_p <= 1 or self.logprobs < 0:
            raise UserError(
                f"Bad sampling parameters: temperature {self.temperature} (>= 0), "
                f"max_new_tokens {self.max_new_tokens} (> 0), top_p {self.top_p} (in (0, 1])."
            )


@dataclass
class Generation:
    token_ids: list[int]
    "The reply's tokens, without the stop token."
    text: str
    "The reply decoded without special tokens."
    finish_reason: str
    "'stop' (a stop token came) or 'length' (cut by max_new_tokens or the context)."
    prompt_tokens: int
    completion_tokens: int
    "Tokens the model generated, the stop token included."
    logprobs: list[tuple[list[int], list[float]]] | None = None
    "With SamplingParams.logprobs = k: per generated token (the stop token included), the top-k (ids, log-probs)."


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


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front of `x` along `dim` up to `width`."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class _BufferLayer(DynamicLayer):
    """One layer of `_KVBuffers` as a transformers cache layer: `update` writes the step's keys and
    values in place and returns the filled columns of the active rows (a view, no copy)."""

    def __init__(self, buffers: _KVBuffers, index: int):
        super().__init__()
        self.buffers, self.index = buffers, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.buffers.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.buffers.end - self.buffers.start


def _plain_dynamic(cache) -> bool:
    """Whether a prefill's cache is a `DynamicCache` of full-attention `DynamicLayer`s only."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


class _KVBuffers:
    """Every layer's keys and values, pre-allocated [row slots, heads, columns, head_dim] and written in place.

    The active rows sit in slots 0..n-1; `slots[i]` is the slot of row i (the decoder's order). A
    leaving row's slot takes one of the last rows, so a `keep` moves only as many rows as left. The
    rows share the filled columns [start, end), left-padded like the prompts: slot s holds its tokens
    in columns first[s]..end-1, and the columns before are masked (zeros or finite stale keys). A
    step writes column `end`. When the columns run out, the filled ones move to the left edge (and
    the capacity doubles if they fill more than half of it).
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int, columns: int):
        self.keys = [_zeros_like(keys, rows, columns) for keys, _ in kv]
        self.values = [_zeros_like(values, rows, columns) for _, values in kv]
        self.n = self.start = self.end = 0
        self.first: list[int] = []  # per active slot: the column of its first token
        self.slots: list[int] = []  # per row: its slot
        self.cache = Cache(layers=[_BufferLayer(self, i) for i in range(len(self.keys))])
        self._index()

    @property
    def capacity(self) -> tuple[int, int]:
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one step's keys/values [n, heads, q, dim] at column `end`; return columns start..end+q-1."""
        stop = self.end + keys.shape[2]
        self.keys[layer][:self.n, :, self.end:stop] = keys
        self.values[layer][:self.n, :, self.end:stop] = values
        return self.keys[layer][:self.n, :, self.start:stop], self.values[layer][:self.n, :, self.start:stop]

    def join(self, kv: list[tuple[torch.Tensor, torch.Tensor]], pads: list[int], budget: int) -> None:
        """Append a prefilled left-padded batch (each layer's keys and values, padding per row) as new rows."""
        new = kv[0][0]
        rows, width = self.n + new.shape[0], new.shape[2]
        if self.n == 0:
            self.start = self.end = width
        slots, columns = self.capacity
        if rows > slots or width > self.end or self.end + budget > columns:
            live = self.end - self.start
            start = max(0, width - live)  # the new prompts fit left of `end`
            need = start + live + budget
            self._relayout(slots if rows <= slots else max(2 * slots, rows),
                           columns if need <= columns else max(2 * columns, need), start)
        low = self.end - width
        for mine, theirs in ((self.keys, [keys for keys, _ in kv]), (self.values, [values for _, values in kv])):
            for buffer, prefilled in zip(mine, theirs):
                buffer[self.n:rows, :, low:self.end] = prefilled
        self.first += [low + p for p in pads]
        self.slots += list(range(self.n, rows))
        self.n, self.start = rows, min(self.first)
        self._index()

    def keep(self, rows: list[int]) -> None:
        """Keep these rows in this order: kept rows in slots >= len(rows) move into the freed slots below."""
        slots, n = [self.slots[i] for i in rows], len(rows)
        movers = sorted(s for s in slots if s >= n)
        if movers:
            holes = sorted(set(range(n)) - set(slots))
            source, target = (torch.tensor(x, device=self.keys[0].device) for x in (movers, holes))
            for buffer in self.keys + self.values:
                filled = buffer[:, :, self.start:self.end]
                filled.index_copy_(0, target, filled.index_select(0, source))
            moved = dict(zip(movers, holes))
            for m, h in moved.items():
                self.first[h] = self.first[m]
            slots = [moved.get(s, s) for s in slots]
        self.first, self.slots, self.n = self.first[:n], slots, n
        self.start = min(self.first, default=self.end)  # columns that are padding in every row are cut
        self._index()

    def step_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids [n, 1], attention mask [n, width + 1] and positions [n, 1] of a step, in slot order."""
        slots, columns = self.capacity
        if self.end == columns:
            live = self.end - self.start
            self._relayout(slots, columns if 2 * (live + 1) <= columns else 2 * columns, 0)
        ids = tokens if self.in_order else tokens.index_select(0, self.rows_t)
        cols = torch.arange(self.start, self.end + 1, device=tokens.device)
        mask = (cols >= self.first_t[:, None]).long()
        return ids[:, None], mask, (self.end - self.first_t)[:, None]

    def step_done(self, logits: torch.Tensor) -> torch.Tensor:
        """Count the written column; return the step's logits [n, V] in row order."""
        self.end += 1
        return logits if self.in_order else logits.index_select(0, self.slots_t)

    def _relayout(self, rows: int, columns: int, start: int) -> None:
        """Move the filled columns to start at `start` in new buffers of this capacity."""
        width, shift = self.end - self.start, start - self.start
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = _zeros_like(old, rows, columns)
                buffers[i][:self.n, :, start:start + width] = old[:self.n, :, self.start:self.end]
        self.first = [f + shift for f in self.first]
        self.start, self.end = start, start + width
        self._index()

    def _index(self) -> None:
        device = self.keys[0].device
        self.in_order = self.slots == list(range(self.n))
        rows = [0] * self.n  # per slot: its row
        for row, slot in enumerate(self.slots):
            rows[slot] = row
        self.first_t = torch.tensor(self.first, dtype=torch.long, device=device)
        self.slots_t = torch.tensor(self.slots, dtype=torch.long, device=device)
        self.rows_t = torch.tensor(rows, dtype=torch.long, device=device)


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


def _zeros_like(x: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return x.new_zeros(rows, x.shape[1], columns, x.shape[3])


class ReferenceDecoder:
    """The model's own forward over a transformers cache (any architecture, any device).

    Default (`in_place`): the keys and values live in `_KVBuffers`, pre-allocated for the prompt
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
        self.buffers: _KVBuffers | None = None  # the in-place path
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
        cache, pads = out.past_key_values, list(batch.pad_lengths)
        if self.in_place and self.cache is None and _plain_dynamic(cache):
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
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._to_buffers(kv, pads, max_new_tokens)
        return logits.float()

    def _to_buffers(self, kv: list[tuple[torch.Tensor, torch.Tensor]], pads: list[int], max_new_tokens: int) -> None:
        if self.buffers is None:
            rows, length = self.hint
            self.buffers = _KVBuffers(kv, max(rows, len(pads)), max(length or 0, kv[0][0].shape[2] + max_new_tokens))
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
        cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        if not _plain_dynamic(cache):
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
        out = self.model(input_ids=batch.input_ids[:, low + shared:], past_key_values=past, use_cache=True,
                         attention_mask=torch.cat([rest.new_ones(rows, shared), rest], dim=1),
                         position_ids=shared + rest.cumsum(-1) - 1, logits_to_keep=1)
        # A row's tokens sit in columns [0, shared) and [shared + pad - low, end): move its prefix next to its rest.
        columns = torch.arange(shared + rest.shape[1], device=device)[None, :]
        shift = pads - low
        index = torch.where((columns >= shift) & (columns < shift + shared), columns - shift, columns)
        kv = []
        for layer in out.past_key_values.layers:
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
                             past_key_values=self.buffers.cache, use_cache=True)
            return self.buffers.step_done(out.logits[:, -1].float())
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


# ---------------------------------------------------------------- sampling


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


def sample_rows(logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
    """Pick one token per row from float32 logits [B, V] with each row's own parameters.

    Greedy rows take the argmax. A sampling row draws from its own generator, so a seeded
    request gets the same reply whatever else shares its batch."""
    tokens = logits.argmax(-1)
    for i, seq in enumerate(rows):
        p = seq.params
        if p.temperature > 0:
            row = filter_top_k_top_p(logits[i:i + 1] / p.temperature, p.top_k, p.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=seq.generator)[0, 0]
    return tokens


def _record_event(device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def seen_tokens(batch: Batch, vocab: int) -> torch.Tensor:
    """[B, V] bool: which tokens each prompt contains (padding excluded)."""
    ids = torch.where(batch.attention_mask.bool(), batch.input_ids, batch.input_ids[:, -1:])
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)


# ---------------------------------------------------------------- text


class TextStream:
    """Turns a growing list of token ids into new text pieces, never half a UTF-8 character.

    Decodes a short window (from `prefix` to the end) and emits what it adds over the window's
    already-emitted part, so word-joining spaces come out as the full decode would print them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if len(full) <= len(done) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]


def end_of_turn_ids(tokenizer, model=None) -> set[int]:
    """EOS ids of the tokenizer and the generation config, plus the token the chat template ends an
    assistant turn with (the last learned token of a rendered one-turn conversation, if special)."""
    ids = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if getattr(tokenizer, "chat_template", None):
        from lorakit.data.render import IGNORE_INDEX, render_conversation

        rendered = render_conversation(tokenizer, [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"}])
        learned = [t for t in rendered.labels if t != IGNORE_INDEX]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if learned and learned[-1] in special:
            ids.add(learned[-1])
    return ids


# ---------------------------------------------------------------- the running batch


@dataclass(eq=False)
class Sequence:
    """One prompt's generation in a running batch: its settings and its reply so far."""

    prompt: list[int]
    params: SamplingParams
    budget: int
    "Most new tokens: max_new_tokens, or what is left of the context."
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    "The reply so far, without the stop token."
    finish_reason: str | None = None
    "None while running; 'stop' or 'length' once done."
    logprobs: list[tuple[list[int], list[float]]] = field(default_factory=list)
    "With params.logprobs: the top-k (ids, log-probs) of every step so far."

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


class RunningBatch:
    """Sequences decoded together that join (`add`) and leave (`remove`, or by finishing) between steps.

    `step()` prefills the sequences added since the last step (one left-padded batch of their
    own, merged into the decoder's rows), picks one token for every row with the row's own
    sampling parameters, and starts the next decode step before the picks reach the host (the
    GPU decodes while Python does the bookkeeping). Finished sequences leave at once. An engine's
    fast decoder has one cache: use one running batch per engine at a time.
    """

    def __init__(self, engine: Engine, decoder, capacity: int):
        self.engine, self.decoder, self.capacity = engine, decoder, capacity
        self.rows: list[Sequence] = []  # the decoder's rows, in its order
        self.pending: list[Sequence] = []  # added, prefilled at the next step
        self.logits: torch.Tensor | None = None  # [rows, V] float32: each row's next-token logits
        self.seen: torch.Tensor | None = None  # [rows, V] bool, kept once a row has a repetition penalty
        self.penalty: torch.Tensor | None = None  # [rows, 1] float32, 1.0 for rows without one

    def __len__(self) -> int:
        return len(self.rows) + len(self.pending)

    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Queue a prompt; it is prefilled and gets its first token at the next `step()`."""
        if len(self) >= self.capacity:
            raise ValueError(f"the running batch is full ({self.capacity} sequences)")
        seq = self.engine.new_sequence(prompt, params)
        self.pending.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (its client went away, say); the other rows go on unchanged."""
        if seq in self.pending:
            self.pending.remove(seq)
        elif seq in self.rows:
            self._keep([i for i, s in enumerate(self.rows) if s is not seq])

    def step(self) -> list[Sequence]:
        """Decode one token for every sequence; returns them (finished ones included, then gone)."""
        if self.decoder.owner is not self:
            raise RuntimeError("A newer running batch of this engine has taken over the fast decoder's cache: "
                               "use one running batch per engine at a time.")
        with torch.inference_mode():
            self._join()
            if not self.rows:
                return []
            top = self._top_logprobs()
            tokens = sample_rows(self._penalised(), self.rows)
            if self.seen is not None:
                self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
            picked = tokens.to("cpu", non_blocking=True)
            ready = _record_event(tokens.device)
            if any(len(s.tokens) + 1 < s.budget for s in self.rows):  # else every row ends here
                self.logits = self.decoder.step(tokens)
            if ready is not None:
                ready.synchronize()
            for row, (seq, token) in enumerate(zip(self.rows, picked.tolist())):
                if top is not None and seq.params.logprobs:
                    k = seq.params.logprobs
                    seq.logprobs.append((top[0][row][:k], top[1][row][:k]))
                if token in seq.stop_ids:
                    seq.finish_reason = "stop"
                else:
                    seq.tokens.append(token)
                    if len(seq.tokens) >= seq.budget:
                        seq.finish_reason = "length"
            stepped = list(self.rows)
            self._keep([i for i, s in enumerate(self.rows) if s.finish_reason is None])
            return stepped

    def _top_logprobs(self) -> tuple[list[list[int]], list[list[float]]] | None:
        """(ids, log-probs) of the largest k any row asks for, every row (host lists), or None."""
        k = max(s.params.logprobs for s in self.rows)
        if not k:
            return None
        values, ids = torch.log_softmax(self.logits.float(), dim=-1).topk(min(k, self.logits.shape[-1]), dim=-1)
        return ids.tolist(), values.tolist()

    def _penalised(self) -> torch.Tensor:
        if self.seen is None:
            return self.logits
        return apply_repetition_penalty(self.logits, self.seen, self.penalty)

    def _join(self) -> None:
        """Prefill the pending sequences and append them to the rows."""
        if not self.pending or (self.rows and not getattr(self.decoder, "can_join", True)):
            return
        new, self.pending = self.pending, []
        batch = left_pad([s.prompt for s in new], self.engine.pad_id, self.engine.device)
        logits = self.decoder.add(batch, max(s.budget for s in new))
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        if self.seen is not None or any(s.params.repetition_penalty != 1.0 for s in new):
            vocab, dev = logits.shape[-1], logits.device
            if self.seen is None:
                self.seen = torch.zeros(len(self.rows), vocab, dtype=torch.bool, device=dev)
                self.penalty = torch.ones(len(self.rows), 1, device=dev)
            penalty = torch.tensor([[s.params.repetition_penalty] for s in new], device=dev)
            self.seen = torch.cat([self.seen, seen_tokens(batch, vocab)])
            self.penalty = torch.cat([self.penalty, penalty])
        self.rows += new

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.rows):
            return
        self.decoder.keep(rows)
        self.rows = [self.rows[i] for i in rows]
        if not rows:
            self.logits = self.seen = self.penalty = None
            return
        index = torch.tensor(rows, device=self.logits.device)
        self.logits = self.logits.index_select(0, index)
        if self.seen is not None:
            self.seen, self.penalty = self.seen.index_select(0, index), self.penalty.index_select(0, index)


# ---------------------------------------------------------------- the engine


class Engine:
    """Batched generation over a transformers causal LM and its tokenizer.

    `fast`: None picks the static-cache decoder on CUDA when the architecture supports it;
    True forces it (on the CPU too: static cache, no CUDA graph); False uses the reference.
    `compile`: a torch.compile mode, True (default mode) or False; on CUDA it defaults to
    max-autotune-no-cudagraphs (Triton GEMV templates: 163 vs 148 tok/s on a 7B, see bench/decode.py;
    the first reply per batch shape pays ~25 s of tuning). The fast decoder copies the stacked
    q/k/v weights when built: make a new Engine after changing the model's weights.
    """

    def __init__(self, model, tokenizer, *, fast: bool | None = None, max_batch_size: int = 32,
                 compile: bool | str | None = None, cuda_graphs: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.stop_ids = end_of_turn_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self._fast = None
        from lorakit.infer import fast_decode

        reason = fast_decode.unsupported_reason(model)
        if fast is None:
            fast = self.device.type == "cuda" and reason is None
        if fast:
            if reason:
                raise UserError(f"The fast decoder cannot run this model: {reason}.")
            on_cuda = self.device.type == "cuda"
            self._fast = fast_decode.StaticDecoder(
                model, compile=(on_cuda and COMPILE_MODE) if compile is None else compile,
                cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs)
        self.fast_note = reason  # why the fast path is off (None when it could run)

    @property
    def uses_fast_path(self) -> bool:
        return self._fast is not None

    def batch(self, capacity: int | None = None, *, length: int | None = None) -> RunningBatch:
        """An empty running batch for up to `capacity` sequences (default max_batch_size) of about
        `length` tokens each, prompt included (a hint for the fast decoder's cache; it grows)."""
        capacity = capacity or self.max_batch_size
        decoder = self._fast or ReferenceDecoder(self.model)
        decoder.reset(capacity, length)
        decoder.owner = RunningBatch(self, decoder, capacity)
        return decoder.owner

    def new_sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """A sequence for `prompt`: checked against the context, with its stop tokens and generator."""
        self._check_prompt(prompt)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        return Sequence(list(prompt), params, min(params.max_new_tokens, self.context - len(prompt)),
                        frozenset(self.stop_ids | set(params.stop_token_ids)), generator)

    def _check_prompt(self, prompt: list[int]) -> None:
        if len(prompt) == 0:
            raise UserError("Every prompt needs at least one token.")
        if len(prompt) >= self.context:
            raise UserError(f"The prompt has {len(prompt)} tokens but the model's context is {self.context}: "
                            "shorten it (or start a new conversation).")

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Generate a reply for every prompt: up to max_batch_size at a time, shortest prompts first;
        a finished reply's row goes at once to the next waiting prompt. `params`: one for all, or one
        per prompt. `progress(n)` is called as n more replies are done."""
        if not prompts:
            return []
        for prompt in prompts:
            self._check_prompt(prompt)
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))
        batch = self.batch(min(self.max_batch_size, len(prompts)),
                           length=max(len(p) + q.max_new_tokens for p, q in zip(prompts, per_prompt)))
        results: list[Generation | None] = [None] * len(prompts)
        index: dict[Sequence, int] = {}
        while waiting or len(batch):
            while waiting and len(batch) < batch.capacity:
                i = waiting.popleft()
                index[batch.add(prompts[i], per_prompt[i])] = i
            done = [seq for seq in batch.step() if seq.finish_reason]
            for seq in done:
                results[index.pop(seq)] = self._finish(seq)
            if done and progress is not None:
                progress(len(done))
        return results

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the reply to one prompt as incremental text pieces (no special tokens)."""
        text = TextStream(self.tokenizer)
        seq = None
        for (seq,) in self.steps([prompt], params):
            for token in seq.tokens[len(text.ids):]:
                piece = text.push(token)
                if piece:
                    yield piece
        tail = text.flush()
        if tail:
            yield tail
        self.last_generation = self._finish(seq)

    def steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[Sequence]]:
        """Batched streaming: yields, after every decode step, each sequence's state (`.tokens` so
        far, `.finish_reason` once done). Close the iterator to stop early."""
        for prompt in prompts:
            self._check_prompt(prompt)
        if not prompts:
            raise UserError("Every prompt needs at least one token.")
        batch = self.batch(len(prompts), length=max(len(p) for p in prompts) + params.max_new_tokens)
        seqs = [batch.add(p, params) for p in prompts]
        while len(batch):
            batch.step()
            yield seqs

    def _finish(self, seq: Sequence) -> Generation:
        return Generation(
            token_ids=list(seq.tokens),
            text=self.tokenizer.decode(seq.tokens, skip_special_tokens=True),
            finish_reason=seq.finish_reason or "length",
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=len(seq.tokens) + (seq.finish_reason == "stop"),
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
        )
