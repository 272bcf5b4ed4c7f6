"""`lorakit deploy`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over lorakit's engine.

- One base model, several LoRA adapters on it (peft `load_adapter` + `set_adapter`), chosen by the
  request's `model` field; the base model answers under its own name (adapters disabled).
- Continuous batching: a worker thread keeps one running batch of the engine (up to
  --max_concurrency rows). Between two decode steps it admits waiting requests into free rows and
  drops finished or cancelled ones, so a request's first token comes one prefill after it is
  admitted, not after the batch in progress ends. Every row has its own sampling settings; the
  rows share one adapter at a time (a request for another adapter waits for the batch to drain,
  at most about ADAPTER_WAIT seconds of overtaking). Waiting requests sit in a bounded queue; past
  --max_queue the server answers 503 with Retry-After.
- Every error is OpenAI-shaped JSON: 400 names the bad field, 401 a missing/wrong key, 404 an
  unknown model or route, 503 a full queue; bad input never causes a 500 or a traceback.
- A client that disconnects mid-stream frees its slot at once and its row leaves the batch at the
  next step.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the (string) annotations in these globals

from lorakit.args import DeployArgs
from lorakit.data.render import render_prompt, strip_system_markers
from lorakit.errors import UserError
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from lorakit.infer.text import TextStream
from lorakit.loader import find_adapter, open_model, resolve_system, saved_args
from lorakit.serve_api import (ApiError, chat_chunk, chat_response, completion_chunk, completion_response, new_id,
                               parse_chat_request, parse_completion_request, usage)

# A waiting request for another adapter than the running batch's is overtaken by requests for the
# running one for at most this many seconds; then the batch takes no new rows until it drains.
ADAPTER_WAIT = 1.0
# No tokenizer's token spans more characters than this, so a longer text cannot fit the context:
# it is refused before tokenising (a 20 MB body once made the server tokenise for 26 s).
CHARS_PER_TOKEN_BOUND = 64
JSON_BYTES_PER_CHAR = 8  # a character may take a 6-byte \\uXXXX escape, plus the JSON around the text


# ---------------------------------------------------------------- the served models


@dataclass
class ServedModel:
    """One name in /v1/models: the base (adapter None) or one LoRA adapter over it."""

    name: str
    adapter: str | None
    system: str | None
    path: str


@dataclass
class Served:
    model: Any
    tokenizer: Any
    engine: Any
    models: dict[str, ServedModel]
    context: int


def _adapter_specs(adapters: list[str]) -> list[tuple[str | None, str]]:
    """--adapters values as (name or None, path): NAME=PATH pairs or plain paths."""
    specs = []
    for item in adapters:
        name, sep, path = item.partition("=")
        specs.append((name, path) if sep and name and not Path(item).exists() else (None, item))
    return specs


def _served_name(ckpt: Path) -> str:
    """A checkpoint's default API name: its run folder for checkpoint-N, else the folder itself."""
    return ckpt.parent.name if ckpt.name.startswith("checkpoint-") else ckpt.name


def public_name(path: Path) -> str:
    """'run/checkpoint-N' for a checkpoint, else the folder's own name: what /v1/models may show."""
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def load_served(args: DeployArgs) -> Served:
    """Load the base model and every adapter (the first through lorakit.loader); name them for the API."""
    system = resolve_system(args.adapter.system)
    specs = _adapter_specs(args.adapter.adapters)
    merge = args.adapter.merge_lora and len(specs) == 1
    first = open_model(args.model, [specs[0][1]] if specs else [], system=args.adapter.system, merge_lora=merge,
                       command="deploy")
    model, tokenizer = first.model, first.tokenizer
    models: dict[str, ServedModel] = {}
    if not specs:
        name = args.served_model_name or first.base_path.name
        models[name] = ServedModel(name, None, system, str(first.base_path))
    else:
        base_path = first.base_path or Path(first.saved.model_path or first.checkpoint)
        ckpts = [first.checkpoint] + [find_adapter(path) for _, path in specs[1:]]
        for i, ((name, _), ckpt) in enumerate(zip(specs, ckpts)):
            saved = first.saved if i == 0 else saved_args(ckpt)
            if saved.model_path and Path(saved.model_path).resolve() != base_path.resolve():
                raise UserError(f"--adapters {ckpt}: trained on {saved.model_path}, but the served base is "
                                f"{base_path}; all adapters of one server must share the base model.")
            if i > 0:
                model.load_adapter(str(ckpt), adapter_name=f"adapter_{i}")
            served = name or (args.served_model_name if len(specs) == 1 else None) or _served_name(ckpt)
            if served in models:
                raise UserError(f"--adapters: two adapters are both named {served!r}; name them with NAME=PATH.")
            models[served] = ServedModel(served, None if merge else ("default" if i == 0 else f"adapter_{i}"),
                                         system if system is not None else saved.system, str(ckpt))
        if not merge:
            models.setdefault(base_path.name, ServedModel(base_path.name, None, system, str(base_path)))
    for served in models.values():  # '<|im_start|>system\nX<|im_end|>' -> 'X', with a warning
        served.system = strip_system_markers(tokenizer, served.system)
    engine = Engine(model, tokenizer, max_batch_size=args.max_concurrency)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    return Served(model, tokenizer, engine, models, context)


# ---------------------------------------------------------------- the scheduler


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
class Job:
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
        self.pending: deque[Job] = deque()
        self.active = 0  # admitted and not yet finished or cancelled
        self.running = 0  # rows in the running batch
        self.adapter: str | None = None  # the adapter the running batch uses
        self.adapter_context = _adapter(served.model, None)
        self.adapter_context.__enter__()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._work, name="lorakit-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.active >= self.capacity:
                raise ApiError(503, f"The server is busy ({self.active} requests in flight, limit {self.capacity}); "
                               "retry shortly.", type="server_busy", headers={"Retry-After": "1"})
            self.active += 1
            self.pending.append(job)
            self.cond.notify()

    def release(self, job: Job, *, cancelled: bool = False) -> None:
        """Free a job's slot once (finished, failed, or its client went away)."""
        with self.cond:
            if cancelled:
                job.cancelled = True
            if not job.done:
                job.done = True
                self.active -= 1

    def _work(self) -> None:
        batch = self.served.engine.batch(self.max_concurrency)
        jobs: list[Job] = []  # the running batch's jobs
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

    def _admit(self, batch, jobs: list[Job]) -> list[Job]:
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
                self._use_adapter(self.pending[0].served.adapter)
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

    def _start(self, batch, job: Job) -> bool:
        try:
            params = SamplingParams(temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                                    max_new_tokens=job.max_tokens)
            job.seq, job.stream = batch.add(job.prompt, params), TextStream(self.served.tokenizer)
            return True
        except Exception as exc:
            self._fail([job], exc)
            return False

    def _use_adapter(self, adapter: str | None) -> None:
        self.adapter_context.__exit__(None, None, None)
        self.adapter, self.adapter_context = adapter, _adapter(self.served.model, adapter)
        self.adapter_context.__enter__()

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
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

    def _advance(self, job: Job, seq, stream) -> None:
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

    def _finish(self, job: Job, reason: str, tail: str, *, stop_token: bool = False) -> None:
        job.text += tail
        if _cut_at_stop(job):
            reason = "stop"
        if len(job.text) > job.sent:
            job.emit(Delta(job.text[job.sent:]))
            job.sent = len(job.text)
        # Like OpenAI, the end-of-turn token the model generated counts as a completion token.
        job.emit(Finished(reason, len(job.prompt), job.tokens + int(stop_token)))
        self.release(job)


def _cut_at_stop(job: Job) -> bool:
    """Cut the job's text at the first stop string; True if one was found."""
    cuts = [job.text.find(s) for s in job.stop if s and s in job.text]
    if not cuts:
        return False
    job.text = job.text[:min(cuts)]
    job.sent = min(job.sent, len(job.text))
    return True


class _adapter:
    """Context: run the peft model with one adapter active, or with adapters off (base model)."""

    def __init__(self, model, adapter: str | None):
        self.model, self.adapter, self.ctx = model, adapter, None

    def __enter__(self):
        if not hasattr(self.model, "peft_config"):
            return
        if self.adapter is None:
            self.ctx = self.model.disable_adapter()
            self.ctx.__enter__()
        else:
            self.model.set_adapter(self.adapter)

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---------------------------------------------------------------- the HTTP app


class OpenAIRoutes:
    """The handlers behind the routes; each checks its input and answers OpenAI-shaped JSON or SSE."""

    def __init__(self, served: Served, scheduler: Scheduler, *, api_key: str | None, default_max_tokens: int):
        self.served, self.scheduler = served, scheduler
        self.api_key, self.default_max_tokens = api_key, default_max_tokens
        # one worker: requests tokenise one at a time (a tokenizer is not made for parallel callers),
        # and never on the event loop
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def off_loop(self, fn, *args, **kwargs):
        """Run fn in the tokenizing thread and await it."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, partial(fn, *args, **kwargs))

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[len("Bearer "):].strip() != self.api_key:
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY' (the --api_key value).",
                           type="authentication_error", code="invalid_api_key")

    @property
    def max_chars(self) -> int:
        """The most prompt characters that could still fit the context."""
        return self.served.context * CHARS_PER_TOKEN_BOUND

    async def read_json(self, request: Request):
        """The request's JSON body, after the key, content-type and size checks (413 past the size limit)."""
        self.check_key(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}.")
        limit = self.max_chars * JSON_BYTES_PER_CHAR
        too_big = ApiError(413, f"The request body is over {limit:,} bytes, more than a prompt that fits the "
                                f"model's {self.served.context}-token context can take.", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length to check up front
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise ApiError(400, "The request body is empty; send a JSON object.")
        try:
            return await asyncio.to_thread(json.loads, raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None

    def check_chars(self, chars: int, field_name: str) -> None:
        """Refuse a text too long for the context before spending time tokenising it."""
        if chars > self.max_chars:
            raise ApiError(400, f"The prompt is {chars:,} characters long, more than the model's "
                           f"{self.served.context}-token context can hold; shorten '{field_name}'.",
                           param=field_name, code="context_length_exceeded")

    def find_model(self, name: str) -> ServedModel:
        if name not in self.served.models:
            raise ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(self.served.models)}.",
                           param="model", code="model_not_found")
        return self.served.models[name]

    async def health(self, request: Request):
        if self.api_key is not None:  # open to probes; without the key it tells them nothing more
            try:
                self.check_key(request)
            except ApiError:
                return {"status": "ok"}
        return {"status": "ok", "models": list(self.served.models), "in_flight": self.scheduler.active,
                "running": self.scheduler.running}

    async def list_models(self, request: Request):
        self.check_key(request)
        # root names the folder, never where it lies on the server's disk
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "lorakit",
                                            "root": public_name(Path(m.path))} for m in self.served.models.values()]}

    async def chat(self, request: Request):
        req = parse_chat_request(await self.read_json(request))
        model = self.find_model(req.model)
        self.check_chars(sum(len(m["content"]) for m in req.messages) + len(model.system or ""), "messages")
        try:  # off the event loop: /health and the streams stay responsive while a long prompt renders
            prompt = await self.off_loop(render_prompt, self.served.tokenizer, req.messages, system=model.system)
        except Exception as exc:  # the chat template may refuse an order of roles (jinja raise_exception)
            raise ApiError(400, f"Invalid 'messages': the chat template cannot render them ({exc}).",
                           param="messages") from None
        job = self.submit(model, prompt, req.sampling, "messages")
        return await self.respond(request, job, req.sampling, model.name, chat=True)

    async def completions(self, request: Request):
        req = parse_completion_request(await self.read_json(request))
        model = self.find_model(req.model)
        vocab = len(self.served.tokenizer)
        if isinstance(req.prompt, list) and (max(req.prompt) >= vocab or min(req.prompt) < 0):
            raise ApiError(400, f"Invalid 'prompt': token ids must be in [0, {vocab}).", param="prompt")
        if isinstance(req.prompt, str):
            self.check_chars(len(req.prompt), "prompt")
            prompt = (await self.off_loop(self.served.tokenizer, req.prompt))["input_ids"]
        else:
            prompt = req.prompt
        job = self.submit(model, prompt, req.sampling, "prompt")
        return await self.respond(request, job, req.sampling, model.name, chat=False)

    def submit(self, model: ServedModel, prompt: list[int], sampling, field_name: str) -> Job:
        """Queue a generation job (400 if the prompt fills the context, 503 if the queue is full)."""
        context = self.served.context
        if len(prompt) >= context:
            raise ApiError(400, f"The prompt is {len(prompt)} tokens long, but the model's context is {context} "
                           f"tokens; shorten '{field_name}'.", param=field_name, code="context_length_exceeded")
        job = Job(served=model, prompt=prompt, temperature=sampling.temperature, top_p=sampling.top_p,
                  seed=sampling.seed, max_tokens=min(sampling.max_tokens or self.default_max_tokens, context - len(prompt)),
                  stop=sampling.stop, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        self.scheduler.submit(job)
        return job

    async def respond(self, request: Request, job: Job, sampling, name: str, *, chat: bool):
        """The whole reply as one JSON body, or an SSE stream; a client that left frees its slot."""
        from fastapi.responses import JSONResponse, StreamingResponse

        rid = new_id("chatcmpl" if chat else "cmpl")
        if sampling.stream:
            return StreamingResponse(self.sse(job, rid, name, chat, sampling.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = ""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody is listening; `finally` frees the slot
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Delta):
                    text += event.text
                    continue
                use = usage(event.prompt_tokens, event.completion_tokens)
                make = chat_response if chat else completion_response
                return JSONResponse(make(rid, name, text, event.finish_reason, use))
        finally:
            self.scheduler.release(job, cancelled=not job.done)

    async def sse(self, job: Job, rid: str, name: str, chat: bool, include_usage: bool):
        """Server-sent events: a chunk per text piece, the finish reason, usage if asked, then [DONE]."""
        def line(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(text: str | None, reason: str | None = None, use: dict | None = None) -> dict:
            if chat:
                return chat_chunk(rid, name, {} if text is None else {"content": text}, reason, use)
            return completion_chunk(rid, name, text or "", reason, use)

        try:
            if chat:
                yield line(chat_chunk(rid, name, {"role": "assistant", "content": ""}))
            while True:
                event = await job.events.get()
                if isinstance(event, Delta):
                    yield line(chunk(event.text))
                    continue
                if isinstance(event, Failed):
                    yield line(event.error.body())
                else:
                    yield line(chunk(None, event.finish_reason))
                    if include_usage:
                        yield line(chunk(None, use=usage(event.prompt_tokens, event.completion_tokens)))
                break
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects: the stream is cancelled mid-way
            self.scheduler.release(job, cancelled=not job.done)


def build_app(served: Served, scheduler: Scheduler, *, api_key: str | None, default_max_tokens: int):
    """The FastAPI app: /health, /v1/models, /v1/chat/completions, /v1/completions, errors as OpenAI JSON."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    routes = OpenAIRoutes(served, scheduler, api_key=api_key, default_max_tokens=default_max_tokens)
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])

    def answer(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def api_error(request, exc: ApiError):
        return answer(exc)

    async def validation_error(request, exc: RequestValidationError):
        return answer(ApiError(400, str(exc)))

    async def http_error(request, exc: HTTPException):  # unknown route (404), wrong method (405)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return answer(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))

    async def server_error(request, exc: Exception):  # a bug of ours: JSON for the client, traceback in the log
        traceback.print_exception(exc, file=sys.stderr)
        return answer(ApiError(500, f"internal error ({type(exc).__name__}); see the server log.", type="server_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
    return app


def main(args: DeployArgs) -> int:
    """Run `lorakit deploy`: load the models and serve them until interrupted."""
    import uvicorn

    served = load_served(args)
    scheduler = Scheduler(served, args.max_concurrency, args.max_queue)
    app = build_app(served, scheduler, api_key=args.api_key, default_max_tokens=args.max_new_tokens)
    names = ", ".join(served.models)
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (context {served.context} tokens, "
          f"{args.max_concurrency} per batch, queue {args.max_queue})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    return 0
