"""GPU fast path of the engine: a static KV cache and a hand-written decode step.

Decoding one token is bound by reading the weights once, so what matters is launching few
kernels and never re-allocating. This decoder:
- pre-allocates the KV cache [B, n_kv, L, head_dim] per layer for a (batch, length) bucket;
- gives every row its own cache column (continuous batching): a new prompt runs through the
  model's own forward (the reference computation) and its cache is copied into a free row, so
  time to first token is one ordinary forward and the running rows are not disturbed;
- decodes with `decode_step`, written over the model's weights for the Llama/Qwen2 family
  (RMSNorm, rotary embedding, grouped-query attention, SwiGLU MLP; the math and the weights'
  layout are in lorakit.infer.decode_step): the step only reads and
  writes fixed buffers, so on CUDA it is captured in a CUDA graph and replayed, and its
  two per-layer halves are compiled with torch.compile so elementwise work fuses;
- attends over the cache columns in use only (`attended_width`: a bucket that covers every running
  row, one captured graph per bucket), so a step's attention reads what the replies have written,
  not the whole cache.

`tests/test_engine.py` and `tests/test_continuous.py` check on the CPU (no graph, no compile) that
it picks the same greedy tokens as `reference_decoder.ReferenceDecoder`, rows joining and leaving included;
`bench/decode.py` checks the same on the GPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorakit.infer.decode_step import (attention_in, attention_out_mlp, final_logits, layer_weights,
                                      lora_kwargs)
from lorakit.infer.live_lora import is_plain_lora
from lorakit.kv_cache import cache_of

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
LENGTH_BUCKET = 256


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model, *, live_lora: bool = False) -> str | None:
    """Why the fast decoder cannot run `model`, or None when it can (live_lora: unmerged plain LoRA layers too)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_ARCHITECTURES:
        return f"architecture {cfg.model_type!r} is not one of {', '.join(SUPPORTED_ARCHITECTURES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "use_sliding_window", False) or any(
            t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention"
    for layer in base_model(model).model.layers:
        linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                   layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        if any(type(m) is not torch.nn.Linear and not (live_lora and is_plain_lora(m)) for m in linears):
            return "the LoRA adapter is not merged into the weights (pass --merge_lora true)"
    return None


# ---------------------------------------------------------------- the decoder


@dataclass
class DecodeState:
    """Every buffer the step reads or writes, for one (rows, length) bucket.

    Each row has its own cache column (`slot`): a row joins by having its prompt's cache copied
    into columns [0, n) of a free row, and leaves by being freed. Free rows keep computing
    harmlessly (their slot and position stop at the last column), which keeps the step's shapes
    fixed for the CUDA graph.
    """

    tokens: torch.Tensor  # [B] long: the token fed next
    positions: torch.Tensor  # [B] long: its rotary position
    slot: torch.Tensor  # [B] long: the cache column each row's token is written to
    mask: torch.Tensor  # [B, L] model dtype: 0 visible, -inf not
    kv: list[torch.Tensor]  # per layer [2, B, KV, L, D]: keys and values in one tensor
    cos: torch.Tensor  # [L, D]
    sin: torch.Tensor
    fill: list[int] = field(default_factory=list)  # host copy: columns each row has written (its next slot)
    graphs: dict[int, tuple] = field(default_factory=dict)  # attended width -> (CUDA graph, its logits buffer)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

def attended_width(columns: int, length: int) -> int:
    """Cache columns a step attends over when the running rows use `columns`: LENGTH_BUCKET times a power of two,
    at most the cache's length: few buckets (few captured graphs), each at most twice what is in use."""
    width = LENGTH_BUCKET
    while width < columns:
        width *= 2
    return min(width, length)


def _bucket(n: int, cap: int) -> int:
    """Batch sizes round up to a power of two, so a few captured graphs serve every batch."""
    return min(1 << (n - 1).bit_length(), max(cap, n))


class StaticDecoder:
    """Engine decoder with a static cache; CUDA graph + torch.compile on the GPU (see module doc).

    Cache size: `reset(rows, length)` asks for rows rounded up to a power of two and `length`
    rounded up to LENGTH_BUCKET columns; a row that needs more columns (its prefill width plus its
    token budget) grows the cache to at least twice its length (up to the context), copying the
    running rows, and captures a new graph (a pause for the running rows: on a GPU, seconds, and
    a recompile the first time). The cache is kept between batches while it is big enough and has
    the asked rows, so a server (always the same rows) captures once per length. It takes rows x
    columns x layers x 2 x kv_heads x head_dim x 2 bytes in bf16: Qwen2.5-7B, 16 rows x 4096
    columns = 3.5 GiB; every step reads all of it, so a longer cache than needed costs time too.
    """

    def __init__(self, model, *, compile: bool | str, cuda_graphs: bool, max_batch_bucket: int = 64,
                 live_lora: bool = False):
        self.model = model
        base = base_model(model)
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.context = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.layers = [layer_weights(layer, live_lora) for layer in base.model.layers]
        self.embed = base.get_input_embeddings().weight
        self.norm = base.model.norm.weight
        self.head = base.get_output_embeddings().weight
        self.rotary = base.model.rotary_emb
        self.cuda_graphs = cuda_graphs
        self.max_batch_bucket = max_batch_bucket
        mode = compile if isinstance(compile, str) else None  # e.g. "max-autotune-no-cudagraphs"
        wrap = (lambda f: torch.compile(f, mode=mode)) if compile else (lambda f: f)
        self.compiled = bool(compile)
        self.attention_in, self.attention_out_mlp, self.final_logits = map(
            wrap, (attention_in, attention_out_mlp, final_logits))
        self.state: DecodeState | None = None
        self.reset(1, None)

    def refresh_lora(self) -> None:
        """Copy a live adapter's current weights into the decode step's buffers (after an optimizer step)."""
        for layer in self.layers:
            for group in layer.lora or ():
                group.refresh()

    # -- public: the engine's Decoder protocol

    def reset(self, rows: int, length: int | None) -> None:
        """Start an empty batch of up to `rows` rows (the cache is made at the first `add`)."""
        self.want_rows = _bucket(rows, self.max_batch_bucket)
        self.want_length = length or 0
        self.slots: list[int] = []  # the state row of each of the engine's rows, in order
        self.index: torch.Tensor | None = None  # the same on the device

    def prefill(self, batch, max_new_tokens: int) -> torch.Tensor:
        """Start over with `batch` as the only rows."""
        self.reset(len(batch.input_ids), batch.input_ids.shape[1] + max_new_tokens)
        return self.add(batch, max_new_tokens)

    def add(self, batch, max_new_tokens: int) -> torch.Tensor:
        """Prefill the new rows with the model's own forward and copy their cache into free rows."""
        rows, width = batch.input_ids.shape
        state = self._state_for(len(self.slots) + rows, width + max_new_tokens)
        taken = set(self.slots)
        free = [r for r in range(state.rows) if r not in taken][:rows]
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Eager even when training compiled the layers (GRPO): a cached, padded prefill would compile them
        # again for every prompt width; once per rollout round it is a small share of the time.
        with torch.compiler.set_stance("force_eager"):
            out = self.model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1)
        index = torch.tensor(free, device=state.tokens.device)
        for kv, (keys, values) in zip(state.kv, _cache_tensors(cache_of(out))):
            kv[0, index, :, :width] = keys.to(kv.dtype)
            kv[1, index, :, :width] = values.to(kv.dtype)
        visible = torch.zeros(mask.shape, dtype=state.mask.dtype, device=mask.device).masked_fill_(
            ~mask.bool(), float("-inf"))
        state.mask.index_fill_(0, index, float("-inf"))
        state.mask[index, :width] = visible
        state.slot.index_fill_(0, index, width)
        for row in free:
            state.fill[row] = width
        state.positions.index_copy_(0, index, mask.sum(-1))
        self._set_slots(self.slots + free)
        return out.logits[:, -1].float()

    def keep(self, rows: list[int]) -> None:
        self._set_slots([self.slots[i] for i in rows])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        state = self.state
        state.tokens.index_copy_(0, self.index, tokens)
        width = attended_width(max(state.fill[r] for r in self.slots) + 1, state.length)
        for r in self.slots:
            state.fill[r] += 1
        if self.cuda_graphs and width not in state.graphs:
            self._capture_or_fall_back(state, width)
        if width in state.graphs:
            graph, logits = state.graphs[width]
            graph.replay()
        else:
            logits = self.decode_step(state, width)
        return logits.index_select(0, self.index)

    def _set_slots(self, slots: list[int]) -> None:
        self.slots = slots
        self.index = torch.tensor(slots, dtype=torch.long, device=self.embed.device)

    # -- the step

    def decode_step(self, s: DecodeState, width: int) -> torch.Tensor:
        """One token per row: write its K/V at the row's own slot, attend over the first `width` columns
        (every running row's slot lies below it), return logits; advance slots and positions (free rows
        stop at the last column).

        Only reads and writes `s`'s fixed buffers (no host sync, no allocation that outlives it),
        which is what makes it capturable in a CUDA graph.
        """
        batch, last = s.rows, s.length - 1
        s.mask.scatter_(1, s.slot[:, None], 0.0)
        column = s.slot.view(1, batch, 1, 1, 1).expand(2, batch, self.n_kv, 1, self.head_dim)
        h = F.embedding(s.tokens, self.embed)
        cos, sin = s.cos[s.positions][:, None], s.sin[s.positions][:, None]
        for weights, kv in zip(self.layers, s.kv):
            lora_in, lora_out = lora_kwargs(weights)
            q, new = self.attention_in(h, *weights.attn_in, cos, sin, self.eps, self.n_heads, self.n_kv, **lora_in)
            kv.scatter_(3, column, new[:, :, :, None])
            h = self.attention_out_mlp(h, q, kv[0, :, :, :width], kv[1, :, :, :width], s.mask[:, :width],
                                       *weights.attn_out, self.eps, **lora_out)
        logits = self.final_logits(h, self.norm, self.head, self.eps)
        s.slot.add_(1).clamp_(max=last)
        s.positions.add_(1).clamp_(max=last)
        return logits

    def _state_for(self, rows: int, length: int) -> DecodeState:
        """The state, grown (running rows copied) or made anew when it lacks rows or columns."""
        s = self.state
        fits = s is not None and s.rows >= rows and s.length >= length
        if fits and (self.slots or s.rows == self.want_rows):
            return s
        rows = max(_bucket(rows, self.max_batch_bucket), self.want_rows)
        length = -(-max(length, self.want_length) // LENGTH_BUCKET) * LENGTH_BUCKET
        running = s if self.slots else None  # its rows are copied over, at the same rows and columns
        if running is not None:
            # Growing stalls the running rows for a graph capture: double, so it happens a few times at most.
            context = -(-self.context // LENGTH_BUCKET) * LENGTH_BUCKET
            grown = max(length, min(2 * s.length, context)) if length > s.length else s.length
            rows, length = max(rows, s.rows), grown
        self.state = s = None  # free an idle bucket's cache before making the new one
        if self.embed.is_cuda:
            torch.cuda.empty_cache()
        new = self._new_state(rows, length)
        if running is not None:
            _copy_rows(running, new)
            del running
        self.state = new  # its graphs are captured at its first steps, one per attended width
        return new

    def _new_state(self, rows: int, length: int) -> DecodeState:
        dev, dtype = self.embed.device, self.embed.dtype
        cache_shape = (rows, self.n_kv, length, self.head_dim)
        cos, sin = self.rotary(torch.zeros((), dtype=dtype, device=dev), torch.arange(length, device=dev)[None])
        return DecodeState(
            tokens=torch.zeros(rows, dtype=torch.long, device=dev),
            positions=torch.zeros(rows, dtype=torch.long, device=dev),
            slot=torch.full((rows,), length - 1, dtype=torch.long, device=dev),
            mask=torch.full((rows, length), float("-inf"), dtype=dtype, device=dev),
            kv=[torch.zeros((2, *cache_shape), dtype=dtype, device=dev) for _ in self.layers],
            cos=cos[0], sin=sin[0], fill=[0] * rows,
        )

    def _capture_or_fall_back(self, s: DecodeState, width: int) -> None:
        """Capture the step; if the compiler fails, capture it uncompiled; if capture fails, decode without a graph."""
        try:
            self._capture(s, width)
        except Exception as exc:  # a compiler or capture problem must not stop the user: slower, same tokens
            if self.compiled:
                warnings.warn(f"torch.compile of the decode step failed ({exc!r:.300}); decoding uncompiled.")
                self.compiled = False
                self.attention_in, self.attention_out_mlp, self.final_logits = (
                    attention_in, attention_out_mlp, final_logits)
                s.graphs.clear()  # captured with the compiled halves: recapture alike
                self._capture_or_fall_back(s, width)
                return
            warnings.warn(f"CUDA graph capture of the decode step failed ({exc!r:.300}); decoding without a graph.")
            self.cuda_graphs = False
            s.graphs.clear()

    def _capture(self, s: DecodeState, width: int) -> None:
        """Warm up (compiles on first use of a shape) on a side stream, then record one step over `width`
        columns as a CUDA graph.

        The warm-up steps write keys and values past each running row's slot, where nothing is
        visible yet, and the row bookkeeping (tokens, positions, slots, mask) is restored after."""
        saved = (s.tokens.clone(), s.positions.clone(), s.slot.clone(), s.mask.clone())
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.decode_step(s, width)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.decode_step(s, width)
            s.graphs[width] = (graph, logits)
        finally:  # also after a failure: the fallback decodes from the same rows
            for buffer, value in zip((s.tokens, s.positions, s.slot, s.mask), saved):
                buffer.copy_(value)


def _copy_rows(old: DecodeState, new: DecodeState) -> None:
    """Copy a smaller state's rows and columns into the front of a bigger one."""
    rows, length = old.rows, old.length
    new.tokens[:rows].copy_(old.tokens)
    new.positions[:rows].copy_(old.positions)
    new.slot[:rows].copy_(old.slot)
    new.fill[:rows] = old.fill
    new.mask[:rows, :length].copy_(old.mask)
    for layer in range(len(new.kv)):
        new.kv[layer][:, :rows, :, :length].copy_(old.kv[layer])


def _cache_tensors(cache):
    """(keys, values) per layer from a transformers cache, old and new layouts."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
