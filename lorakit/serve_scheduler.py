"""The deploy scheduler: one worker thread decodes every request in flight in one running batch.

Continuous batching: between two decode steps the worker admits waiting requests into free rows
(up to --max_concurrency) and drops finished or cancelled ones, so a request's first token comes one
prefill after it is admitted, not after the batch in progress ends. Every row has its own sampling
settings; the rows share one adapter at a time. A request's events (Delta, Finished, Failed) go to
its asyncio queue, which the HTTP handlers (serve.py) read.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import UserError
from lorakit.infer.sampling import SamplingParams
from lorakit.infer.text import TextStream
from lorakit.serve_api import ApiError
from lorakit.serve_models import Served, ServedModel, active_adapter

# A waiting request for another adapter than the running batch's is overtaken by requests for the
# running one for at most this many seconds; then the batch takes no new rows until it drains.
ADAPTER_WAIT = 1.0


@dataclass(frozen=True)
class Delta:
    """A piece of the reply's text, ready to send."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The reply is complete: why it ended and the token counts of the usage block."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Generation failed: the OpenAI-shaped error to answer with."""

    error: ApiError


JobEvent = Delta | Finished | Failed


@dataclass
class GenerationJob:
    """One request in flight: its prompt and settings, and the queue its events go to."""

    served: ServedModel
    prompt: list[int]
    temperature: float
    top_p: float
    seed: int | None
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    done: bool = False
    text: str = ""
    sent: int = 0
    tokens: int = 0
    queued_at: float = field(default_factory=time.monotonic)
    seq: Any = None  # its engine Sequence, once admitted into the running batch
    stream: Any = None  # its TextStream, likewise

    def emit(self, event: JobEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """A bounded queue of jobs and one worker thread that decodes them in one running batch.

    Between two decode steps the worker drops the rows of finished or cancelled jobs and admits
    waiting jobs into the free rows (up to max_concurrency), so a request starts at the next step
    instead of when the batch ends. The rows of a batch share one adapter (see `_admit`).
    """

    def __init__(self, served: Served, max_concurrency: int, max_queue: int):
        self.served = served
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + max_queue
        self.pending: deque[GenerationJob] = deque()
        self.active = 0  # admitted and not yet finished or cancelled
        self.running = 0  # rows in the running batch
        self.adapter: str | None = None  # the adapter the running batch uses
        self.adapter_context = active_adapter(served.model, None)
        self.adapter_context.__enter__()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="lorakit-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: GenerationJob) -> None:
        with self.cond:
            if self.active >= self.capacity:
                raise ApiError(503, f"The server is busy ({self.active} requests in flight, limit {self.capacity}); "
                               "retry shortly.", type="server_busy", headers={"Retry-After": "1"})
            self.active += 1
            self.pending.append(job)
            self.cond.notify()

    def release(self, job: GenerationJob, *, cancelled: bool = False) -> None:
        """Free a job's slot once (finished, failed, or its client went away)."""
        with self.cond:
            if cancelled:
                job.cancelled = True
            if not job.done:
                job.done = True
                self.active -= 1

    def _work(self) -> None:
        batch = self.served.engine.batch(self.max_concurrency)
        jobs: list[GenerationJob] = []  # the running batch's jobs
        while True:
            jobs += self._admit(batch, jobs)
            try:
                for seq in batch.step():
                    job = next(j for j in jobs if j.seq is seq)
                    if not job.done:
                        self._advance(job, seq, job.stream)
            except Exception as exc:  # a failed step must fail its requests, not the server
                self._fail(jobs, exc)
                jobs, batch = [], self.served.engine.batch(self.max_concurrency)
            for job in [j for j in jobs if j.done]:  # finished, cut by a stop string, or its client left
                batch.remove(job.seq)
                jobs.remove(job)
            self.running = len(batch)

    def _admit(self, batch, jobs: list[GenerationJob]) -> list[GenerationJob]:
        """Move waiting jobs into the batch's free rows (waits while there is nothing to do).

        The rows share the running adapter: a job for another adapter waits until the batch has
        drained, then its adapter runs. Jobs for the running adapter may overtake it only while it
        has waited less than ADAPTER_WAIT seconds, so no adapter starves under a steady load.
        (Not peft's mixed-adapter batches, `adapter_names=`: the engine would have to pass each
        row's adapter into every forward, peft runs each adapter's rows as a sub-batch in every
        LoRA layer, and the merged fast path has no adapters; one adapter per batch keeps the
        engine free of PEFT and costs only a drain when the requested adapter changes.)
        """
        with self.cond:
            while True:
                self.pending = deque(j for j in self.pending if not j.cancelled)
                if jobs or self.pending:
                    break
                self.cond.wait()
            if not jobs and self.pending and self.pending[0].served.adapter != self.adapter:
                self._useactive_adapter(self.pending[0].served.adapter)
            admitted = []
            for job in list(self.pending):
                if len(batch) + len(admitted) >= self.max_concurrency:
                    break
                if job.served.adapter != self.adapter:
                    if time.monotonic() - job.queued_at > ADAPTER_WAIT:
                        break  # let the batch drain for it
                    continue
                self.pending.remove(job)
                admitted.append(job)
        self.running = len(batch) + len(admitted)
        return [job for job in admitted if self._start(batch, job)]

    def _start(self, batch, job: GenerationJob) -> bool:
        try:
            params = SamplingParams(temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                                    max_new_tokens=job.max_tokens)
            job.seq, job.stream = batch.add(job.prompt, params), TextStream(self.served.tokenizer)
            return True
        except Exception as exc:
            self._fail([job], exc)
            return False

    def _useactive_adapter(self, adapter: str | None) -> None:
        self.adapter_context.__exit__(None, None, None)
        self.adapter, self.adapter_context = adapter, active_adapter(self.served.model, adapter)
        self.adapter_context.__enter__()

    def _fail(self, jobs: list[GenerationJob], exc: Exception) -> None:
        error = exc if isinstance(exc, ApiError) else ApiError(
            400 if isinstance(exc, UserError) else 500,
            str(exc) if isinstance(exc, UserError) else f"generation failed: {type(exc).__name__}",
            type="invalid_request_error" if isinstance(exc, UserError) else "server_error")
        if not isinstance(exc, (UserError, ApiError)):
            traceback.print_exc(file=sys.stderr)
        for job in jobs:
            if not job.done:
                job.emit(Failed(error))
                self.release(job)

    def _advance(self, job: GenerationJob, seq, stream) -> None:
        """Feed a sequence's new tokens into its job: text pieces, stop strings, max_tokens."""
        for token in seq.tokens[job.tokens:]:
            job.tokens += 1
            job.text += stream.push(token)
            if _cut_at_stop(job):
                return self._finish(job, "stop", "")
            if job.tokens >= job.max_tokens:
                return self._finish(job, "length", stream.flush())
        if seq.finish_reason:
            return self._finish(job, seq.finish_reason, stream.flush(), stop_token=seq.finish_reason == "stop")
        hold = max((len(s) - 1 for s in job.stop), default=0)  # a stop string may still be forming
        safe = len(job.text) - hold
        if safe > job.sent:
            job.emit(Delta(job.text[job.sent:safe]))
            job.sent = safe

    def _finish(self, job: GenerationJob, reason: str, tail: str, *, stop_token: bool = False) -> None:
        job.text += tail
        if _cut_at_stop(job):
            reason = "stop"
        if len(job.text) > job.sent:
            job.emit(Delta(job.text[job.sent:]))
            job.sent = len(job.text)
        # Like OpenAI, the end-of-turn token the model generated counts as a completion token.
        job.emit(Finished(reason, len(job.prompt), job.tokens + int(stop_token)))
        self.release(job)


def _cut_at_stop(job: GenerationJob) -> bool:
    """Cut the job's text at the first stop string; True if one was found."""
    cuts = [job.text.find(s) for s in job.stop if s and s in job.text]
    if not cuts:
        return False
    job.text = job.text[:min(cuts)]
    job.sent = min(job.sent, len(job.text))
    return True
