"""Continuous batching: sequences join and leave a batch between decode steps, each with its own
sampling settings and stop tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lorakit.infer.decoder import Decoder, left_pad
from lorakit.infer.sampling import SamplingParams, apply_repetition_penalty, check_picks, sample_tokens, seen_tokens

if TYPE_CHECKING:  # the engine makes running batches; a batch only calls back into it
    from lorakit.infer.engine import Engine


@dataclass(eq=False)
class Sequence:
    """One prompt's generation in a running batch: its settings and its reply so far."""

    prompt: list[int]
    params: SamplingParams
    budget: int
    "Most new tokens: max_new_tokens, or what is left of the context."
    stop_ids: frozenset[int]
    seed: int = 0
    "The sampling seed (params.seed, or a random one when it is None); unused by greedy rows."
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

    def __init__(self, engine: Engine, decoder: Decoder, capacity: int):
        self.engine, self.decoder, self.capacity = engine, decoder, capacity
        self.rows: list[Sequence] = []  # the decoder's rows, in its order
        self.pending: list[Sequence] = []  # added, prefilled at the next step
        self.logits: torch.Tensor | None = None  # [rows, V] float32: each row's next-token logits
        self.seen: torch.Tensor | None = None  # [rows, V] bool, kept once a row has a repetition penalty
        self.penalty: torch.Tensor | None = None  # [rows, 1] float32, 1.0 for rows without one
        self.seeds: torch.Tensor | None = None  # [rows] int64: each row's sampling seed
        self.draws: torch.Tensor | None = None  # [rows] int64: tokens each row has sampled so far

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
            tokens = sample_tokens(self._penalised(), [s.params for s in self.rows], self.seeds, self.draws)
            self.draws += 1
            if self.seen is not None:
                self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
            picked = tokens.to("cpu", non_blocking=True)
            ready = _record_event(tokens.device)
            if any(len(s.tokens) + 1 < s.budget for s in self.rows):  # else every row ends here
                self.logits = self.decoder.step(tokens.clamp(min=0))  # a -1 (no valid pick) is raised on below
            if ready is not None:
                ready.synchronize()
            picked = picked.tolist()
            check_picks(picked)
            for row, (seq, token) in enumerate(zip(self.rows, picked)):
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
        seeds = torch.tensor([s.seed for s in new], dtype=torch.int64, device=logits.device)
        self.seeds = seeds if self.seeds is None else torch.cat([self.seeds, seeds])
        draws = torch.zeros(len(new), dtype=torch.int64, device=logits.device)
        self.draws = draws if self.draws is None else torch.cat([self.draws, draws])
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
            self.logits = self.seen = self.penalty = self.seeds = self.draws = None
            return
        index = torch.tensor(rows, device=self.logits.device)
        self.logits = self.logits.index_select(0, index)
        self.seeds, self.draws = self.seeds.index_select(0, index), self.draws.index_select(0, index)
        if self.seen is not None:
            self.seen, self.penalty = self.seen.index_select(0, index), self.penalty.index_select(0, index)


def _record_event(device: torch.device) -> torch.cuda.Event | None:
    """A CUDA event recorded now (None off CUDA): the host waits for the picked tokens, not the next step."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
