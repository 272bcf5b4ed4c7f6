"""`lorakit deploy`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over lorakit's engine.

This file holds the HTTP side: the routes, their input checks and the app. The parts below it:
- serve_models.py: one base model, several LoRA adapters on it (peft `load_adapter` +
  `set_adapter`), chosen by the request's `model` field; the base answers under its own name.
- serve_scheduler.py: continuous batching in one worker thread; the rows share one adapter at a
  time (a request for another adapter waits for the batch to drain, at most about ADAPTER_WAIT
  seconds of overtaking). Waiting requests sit in a bounded queue; past --max_queue the server
  answers 503 with Retry-After.
- serve_api.py: the OpenAI wire format (request checks, response shapes).
- Every error is OpenAI-shaped JSON: 400 names the bad field, 401 a missing/wrong key, 404 an
  unknown model or route, 503 a full queue; bad input never causes a 500 or a traceback.
- A client that disconnects mid-stream frees its slot at once and its row leaves the batch at the
  next step.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request  # Request at module level: FastAPI resolves the (string) annotations here
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.args import DeployArgs
from lorakit.data.render import render_prompt
from lorakit.serve_api import (ApiError, chat_chunk, chat_response, completion_chunk, completion_response, new_id,
                               parse_chat_request, parse_completion_request, usage)
from lorakit.serve_models import Served, ServedModel, load_served, public_name
from lorakit.serve_scheduler import Delta, Failed, GenerationJob, Scheduler

# No tokenizer's token spans more characters than this, so a longer text cannot fit the context:
# it is refused before tokenising (a 20 MB body once made the server tokenise for 26 s).
CHARS_PER_TOKEN_BOUND = 64
JSON_BYTES_PER_CHAR = 8  # a character may take a 6-byte \\uXXXX escape, plus the JSON around the text


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

    def submit(self, model: ServedModel, prompt: list[int], sampling, field_name: str) -> GenerationJob:
        """Queue a generation job (400 if the prompt fills the context, 503 if the queue is full)."""
        context = self.served.context
        if len(prompt) >= context:
            raise ApiError(400, f"The prompt is {len(prompt)} tokens long, but the model's context is {context} "
                           f"tokens; shorten '{field_name}'.", param=field_name, code="context_length_exceeded")
        job = GenerationJob(served=model, prompt=prompt, temperature=sampling.temperature, top_p=sampling.top_p,
                  seed=sampling.seed, max_tokens=min(sampling.max_tokens or self.default_max_tokens, context - len(prompt)),
                  stop=sampling.stop, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        self.scheduler.submit(job)
        return job

    async def respond(self, request: Request, job: GenerationJob, sampling, name: str, *, chat: bool):
        """The whole reply as one JSON body, or an SSE stream; a client that left frees its slot."""
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

    async def sse(self, job: GenerationJob, rid: str, name: str, chat: bool, include_usage: bool):
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
    served = load_served(args)
    scheduler = Scheduler(served, args.max_concurrency, args.max_queue)
    app = build_app(served, scheduler, api_key=args.api_key, default_max_tokens=args.max_new_tokens)
    names = ", ".join(served.models)
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (context {served.context} tokens, "
          f"{args.max_concurrency} per batch, queue {args.max_queue})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    return 0
