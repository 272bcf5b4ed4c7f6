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

The parts, one job per module: `decoder` (the prompt batch and the decoder protocol), `kv_buffers`
(the in-place cache), `reference_decoder`, `sampling`, `text` (streaming, end-of-turn ids),
`running_batch` (continuous batching) and this engine. `greedy_reference.greedy_generate` is a plain
loop over the model with no cache at all, the ground truth the tests compare the engine with.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from lorakit.errors import UserError
from lorakit.infer import fast_decode
from lorakit.infer.decoder import Batch, Decoder, left_pad
from lorakit.infer.reference_decoder import MIN_SHARED_PREFIX, ReferenceDecoder
from lorakit.infer.running_batch import RunningBatch, Sequence
from lorakit.infer.sampling import SamplingParams, apply_repetition_penalty, filter_top_k_top_p, sample_tokens
from lorakit.infer.text import TextStream, end_of_turn_ids

__all__ = [  # the engine's public names, importable from here as before the split
    "Batch", "COMPILE_MODE", "Decoder", "Engine", "Generation", "MIN_SHARED_PREFIX", "ReferenceDecoder",
    "RunningBatch", "SamplingParams", "Sequence", "TextStream", "apply_repetition_penalty", "end_of_turn_ids",
    "filter_top_k_top_p", "left_pad", "sample_tokens",
]

COMPILE_MODE = "max-autotune-no-cudagraphs"  # the fast decoder's torch.compile mode on CUDA


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

    @property
    def finished(self) -> bool:
        """The reply ended on its own (a stop token came), not cut by a length limit."""
        return self.finish_reason == "stop"


class Engine:
    """Batched generation over a transformers causal LM and its tokenizer.

    `fast`: None picks the static-cache decoder on CUDA when the architecture supports it;
    True forces it (on the CPU too: static cache, no CUDA graph); False uses the reference.
    `compile`: a torch.compile mode, True (default mode) or False; on CUDA it defaults to
    max-autotune-no-cudagraphs (Triton GEMV templates: 163 vs 148 tok/s on a 7B, see bench/decode.py;
    the first reply per batch shape pays ~25 s of tuning). The fast decoder copies the stacked
    q/k/v weights when built: make a new Engine after changing the model's weights.
    """

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, *, fast: bool | None = None, max_batch_size: int = 32,
                 compile: bool | str | None = None, cuda_graphs: bool | None = None, live_adapter: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.stop_ids = end_of_turn_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self._fast = None
        # live_adapter: an unmerged LoRA adapter that keeps training (GRPO); call refresh_adapter() after a step
        reason = fast_decode.unsupported_reason(model, live_lora=live_adapter)
        if fast is None:
            fast = self.device.type == "cuda" and reason is None
        if fast:
            if reason:
                raise UserError(f"The fast decoder cannot run this model: {reason}.")
            on_cuda = self.device.type == "cuda"
            self._fast = fast_decode.StaticDecoder(
                model, compile=(on_cuda and COMPILE_MODE) if compile is None else compile,
                cuda_graphs=on_cuda if cuda_graphs is None else cuda_graphs, live_lora=live_adapter)
        self.fast_note = reason  # why the fast path is off (None when it could run)

    @property
    def uses_fast_path(self) -> bool:
        return self._fast is not None

    def refresh_adapter(self) -> None:
        """Let the fast decoder see a live adapter's new weights (the reference decoder always does)."""
        if self._fast is not None:
            self._fast.refresh_lora()

    def batch(self, capacity: int | None = None, *, length: int | None = None) -> RunningBatch:
        """An empty running batch for up to `capacity` sequences (default max_batch_size) of about
        `length` tokens each, prompt included (a hint for the fast decoder's cache; it grows)."""
        capacity = capacity or self.max_batch_size
        decoder = self._fast or ReferenceDecoder(self.model)
        decoder.reset(capacity, length)
        decoder.owner = RunningBatch(self, decoder, capacity)
        return decoder.owner

    def new_sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """A sequence for `prompt`: checked against the context, with its stop tokens and sampling seed
        (params.seed, else one drawn from torch's default generator, so torch.manual_seed repeats it)."""
        self._check_prompt(prompt)
        seed = params.seed if params.seed is not None else int(torch.randint(-(1 << 63), (1 << 63) - 1, ()))
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.stop_ids)
        return Sequence(list(prompt), params, min(params.max_new_tokens, self.context - len(prompt)),
                        frozenset(stops), seed)

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
