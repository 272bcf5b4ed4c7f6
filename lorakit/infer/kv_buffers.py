"""Pre-allocated keys and values written in place: the reference decoder's default cache (a
transformers `DynamicCache` copies the whole cache with torch.cat every step in every layer)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class _BufferLayer(DynamicLayer):
    """One layer of `KVBuffers` as a transformers cache layer: `update` writes the step's keys and
    values in place and returns the filled columns of the active rows (a view, no copy)."""

    def __init__(self, buffers: KVBuffers, index: int):
        super().__init__()
        self.buffers, self.index = buffers, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.buffers.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.buffers.end - self.buffers.start


def plain_dynamic(cache) -> bool:
    """Whether a prefill's cache is a `DynamicCache` of full-attention `DynamicLayer`s only."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


class KVBuffers:
    """Every layer's keys and values, pre-allocated [row slots, heads, columns, head_dim] and written in place.

    The active rows sit in slots 0..n-1; `slots[i]` is the slot of row i (the decoder's order). A
    leaving row's slot takes one of the last rows, so a `keep` moves only as many rows as left. The
    rows share the filled columns [start, end), left-padded like the prompts: slot s holds its tokens
    in columns first[s]..end-1, and the columns before are masked (zeros or finite stale keys). A
    step writes column `end`. When the columns run out, the filled ones move to the left edge (and
    the capacity doubles if they fill more than half of it).
    """

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int, columns: int):
        self.keys = [zeros_like(keys, rows, columns) for keys, _ in kv]
        self.values = [zeros_like(values, rows, columns) for _, values in kv]
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
                buffers[i] = zeros_like(old, rows, columns)
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


def zeros_like(x: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Zeros shaped like `x` [rows, heads, columns, head_dim] with `rows` rows and `columns` columns."""
    return x.new_zeros(rows, x.shape[1], columns, x.shape[3])
