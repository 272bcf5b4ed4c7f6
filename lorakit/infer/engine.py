"""Generation engine: our own decode loop over a transformers causal LM.

Prompts are token ids (made by `lorakit.data.render.render_prompt`). A batch is left-padded so
every sequence ends at the same cache slot; each step feeds one token per sequence and a
sequence stops on its own at EOS, the template's end-of-turn token or a caller's stop id.

Two decoders produce the next-token logits, and the loop, sampling and stopping around them
are shared:
- `ReferenceDecoder`: the model's own forward with a transformers `DynamicCache`. Works for any
  architecture, on any device; it is the reference the fast path is tested against.
- `lorakit.infer.fast_decode.StaticDecoder`: a pre-allocated static KV cache and a decode step
  written over the model's weights, captured in a CUDA graph (and compiled) on a GPU. Used on
  CUDA for the Llama/Qwen2 family; `tests/test_engine.py` proves it picks the same greedy
  tokens as the reference on the CPU, and `bench/decode.py` checks it on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from lorakit.errors import UserError

COMPILE_MODE = "max-autotune-no-cudagraphs"  # the fast decoder's torch.compile mode on CUDA


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

    def __post_init__(self):
        if self.temperature < 0 or self.max_new_tokens <= 0 or not 0 < self.top_p <= 1:
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


@dataclass
class Batch:
    """Left-padded prompts: every row ends at column `input_ids.shape[1] - 1`."""

    input_ids: torch.Tensor  # [B, P] long
    attention_mask: torch.Tensor  # [B, P] long, 0 on padding
    pad_lengths: list[int] = field(default_factory=list)


class Decoder(Protocol):
    def prefill(self, batch: Batch, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts; return the last position's logits [B, V] (float32)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; return the next logits [B, V] (float32)."""


def left_pad(prompts: list[list[int]], pad_id: int, device) -> Batch:
    """Stack prompts into one left-padded batch."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[pad_id] * n + p for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * n + [1] * len(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    return Batch(ids, mask, pads)


class ReferenceDecoder:
    """The model's own forward with a growing transformers cache (any architecture, any device)."""

    def __init__(self, model):
        self.model = model

    def prefill(self, batch: Batch, max_new_tokens: int) -> torch.Tensor:
        self.mask = batch.attention_mask
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=batch.input_ids, attention_mask=self.mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.positions = positions[:, -1:]
        return out.logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


# ---------------------------------------------------------------- sampling


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
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


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from float32 logits [B, V]; greedy when temperature is 0."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


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


# ---------------------------------------------------------------- the engine


@dataclass
class _Seq:
    prompt_tokens: int
    budget: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


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

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Generate a reply for every prompt (batched, shortest prompts together)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            seqs = None
            for seqs in self._run([prompts[i] for i in chunk], params):
                pass
            for i, seq in zip(chunk, seqs):
                results[i] = self._finish(seq)
        return results

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the reply to one prompt as incremental text pieces (no special tokens)."""
        text = TextStream(self.tokenizer)
        seq = None
        for (seq,) in self._run([prompt], params):
            for token in seq.tokens[len(text.ids):]:
                piece = text.push(token)
                if piece:
                    yield piece
        tail = text.flush()
        if tail:
            yield tail
        self.last_generation = self._finish(seq)

    def steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[_Seq]]:
        """Batched streaming: yields, after every decode step, each sequence's state (`.tokens` so
        far, `.finish_reason` once done). Close the iterator to stop early."""
        return self._run(prompts, params)

    def _finish(self, seq: _Seq) -> Generation:
        return Generation(
            token_ids=list(seq.tokens),
            text=self.tokenizer.decode(seq.tokens, skip_special_tokens=True),
            finish_reason=seq.finish_reason or "length",
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=len(seq.tokens) + (seq.finish_reason == "stop"),
        )

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[_Seq]]:
        """The decode loop: yields the sequences after every step (each has its reply so far)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("Every prompt needs at least one token.")
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise UserError(f"The prompt has {longest} tokens but the model's context is {self.context}: "
                            "shorten it (or start a new conversation).")
        max_new = min(params.max_new_tokens, self.context - longest)
        seqs = [_Seq(len(p), max_new) for p in prompts]
        stop = torch.tensor(sorted(self.stop_ids | set(params.stop_token_ids)), dtype=torch.long, device=self.device)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        decoder = self._fast or ReferenceDecoder(self.model)
        batch = left_pad(prompts, self.pad_id, self.device)
        seen = None
        with torch.inference_mode():
            logits = decoder.prefill(batch, max_new)
            if params.repetition_penalty != 1.0:
                seen = seen_tokens(batch, logits.shape[-1])
            for step in range(max_new):
                tokens = sample_next(logits, params, seen, generator)
                if seen is not None:
                    seen[torch.arange(len(tokens), device=self.device), tokens] = True
                # Copy the picks to the host and start the next step before waiting for the copy,
                # so the GPU decodes while Python does the bookkeeping (one spare step at the end).
                picked = torch.stack([tokens, torch.isin(tokens, stop).long()]).to("cpu", non_blocking=True)
                ready = _record_event(self.device)
                if step < max_new - 1:
                    logits = decoder.step(tokens)
                if ready is not None:
                    ready.synchronize()
                for seq, tok, stopped in zip(seqs, *picked.tolist()):
                    if seq.finish_reason is None:
                        if stopped:
                            seq.finish_reason = "stop"
                        else:
                            seq.tokens.append(tok)
                            if len(seq.tokens) >= seq.budget:
                                seq.finish_reason = "length"
                yield seqs
                if all(s.finish_reason for s in seqs):
                    break

