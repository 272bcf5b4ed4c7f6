"""lorakit deploy: the official openai client against a real server process (tiny Qwen2 + two LoRA adapters),
malformed requests answered as OpenAI-shaped 4xx JSON, a bounded concurrent load, disconnects, the queue bound."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_export import make_lora_checkpoint

KEY = "sk-lorakit-test"
MAX_TOKENS = 8
LOAD_TOKENS = 4  # the load test checks batching and streaming, not length: keep its CPU time small


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
        key: str | None = KEY) -> tuple[int, dict, dict]:
    """One HTTP request with full control over body and headers; returns (status, headers, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else {}


@pytest.fixture(scope="module")
def adapters(tiny_qwen2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    alpha = make_lora_checkpoint(tiny_qwen2_dir, root / "alpha" / "checkpoint-1", system="You are Alpha.")
    torch_seed_shift = make_lora_checkpoint(tiny_qwen2_dir, root / "beta" / "checkpoint-2", rank=4)
    return {"alpha": alpha, "beta": torch_seed_shift}


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir, adapters, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lorakit.cli", "deploy", "--model", str(tiny_qwen2_dir),
           "--adapters", f"alpha={adapters['alpha']}", str(adapters["beta"]),
           "--host", "127.0.0.1", "--port", str(port), "--api_key", KEY, "--max_concurrency", "16",
           "--max_new_tokens", str(MAX_TOKENS)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if raw(port, "GET", "/health", key=None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "server did not start: " + log.read_text()[-3000:]
            time.sleep(0.5)
        yield {"port": port, "log": log, "base": Path(tiny_qwen2_dir).name}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]  # bad input never reaches a traceback


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(tiny_qwen2_dir, adapters):
    """Greedy replies computed in this process through lorakit's own loader, renderer and engine."""
    from lorakit.checkpoint import load_checkpoint
    from lorakit.data.render import render_prompt
    from lorakit.infer.engine import Engine, SamplingParams
    from lorakit.model import load_model, load_tokenizer

    cache: dict = {}

    def reply(model_name: str, question: str, max_tokens: int = MAX_TOKENS) -> str:
        if model_name not in cache:
            if model_name in adapters:
                loaded = load_checkpoint(adapters[model_name], torch_dtype="float32", device="cpu")
                cache[model_name] = (Engine(loaded.model, loaded.tokenizer, fast=False), loaded.tokenizer,
                                     loaded.args.get("system"))
            else:
                tokenizer = load_tokenizer(tiny_qwen2_dir)
                model = load_model(tiny_qwen2_dir, torch_dtype="float32", device="cpu")
                cache[model_name] = (Engine(model, tokenizer, fast=False), tokenizer, None)
        engine, tokenizer, system = cache[model_name]
        prompt = render_prompt(tokenizer, [{"role": "user", "content": question}], system=system)
        return engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=max_tokens))[0].text

    return reply


def chat(client, model: str, question: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=MAX_TOKENS, **kw)


def test_models_listing_names_base_and_adapters(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["alpha", "beta", server["base"]]
    # no absolute paths: the folder names only
    assert [m.root for m in models] == ["alpha/checkpoint-1", "beta/checkpoint-2", server["base"]]


def test_health_without_the_key_says_only_ok(server):
    assert raw(server["port"], "GET", "/health", key=None)[2] == {"status": "ok"}
    assert raw(server["port"], "GET", "/health")[2]["models"] == ["alpha", "beta", server["base"]]


def test_huge_requests_are_refused_while_health_answers_at_once(server):
    """A 20 MB body is refused (413) unread; a body under the limit whose text cannot fit the context is
    refused (400) before tokenising; meanwhile /health answers within a second."""
    port = server["port"]
    huge = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hello " * 3_500_000}]}).encode()
    long = json.dumps({"model": "alpha", "prompt": "hello " * 300_000}).encode()  # 1.8 MB, 300k tokens
    statuses, errors = [], []

    def send(body: bytes) -> None:
        try:
            statuses.append(raw(port, "POST", "/v1/chat/completions" if body is huge else "/v1/completions", body))
        except OSError as exc:  # the server may close the connection before the client finished sending
            errors.append(exc)

    senders = [threading.Thread(target=send, args=(b,)) for b in (huge, long, huge, long)]
    for t in senders:
        t.start()
    waits = []
    while any(t.is_alive() for t in senders):
        started = time.perf_counter()
        assert raw(port, "GET", "/health", key=None)[0] == 200
        waits.append(time.perf_counter() - started)
        time.sleep(0.05)
    for t in senders:
        t.join()
    assert waits and max(waits) < 1.0, waits
    codes = sorted(s for s, _, _ in statuses)
    assert codes == [400] * 2 + [413] * (len(statuses) - 2), (statuses, errors)
    assert all(a["error"]["code"] == "context_length_exceeded" for s, _, a in statuses if s == 400)
    # the size is refused from the declared length alone, before the body is read
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 20000000\r\n\r\n{")
    assert sock.recv(100).startswith(b"HTTP/1.1 413 ")
    sock.close()


def test_chat_non_stream_picks_the_adapter_by_name(client, server, expected):
    answers = {}
    for name in ("alpha", "beta", server["base"]):
        r = chat(client, name, "Hello, who are you?")
        assert r.model == name and r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > 10 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert 0 < r.usage.completion_tokens <= MAX_TOKENS + 1
        assert r.choices[0].message.content == expected(name, "Hello, who are you?")
        answers[name] = r.choices[0].message.content
    assert len(set(answers.values())) == 3  # three different models answered


def test_chat_stream_matches_non_stream_and_ends_with_usage(client):
    full = chat(client, "alpha", "Tell me a story.").choices[0].message.content
    chunks = list(chat(client, "alpha", "Tell me a story.", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_sse_wire_format_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    body = json.dumps({"model": "beta", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": 4, "temperature": 0})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [line for line in resp.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_and_stop_strings(client, server):
    r = client.completions.create(model=server["base"], prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == 4 and r.choices[0].text
    text = r.choices[0].text
    stop = text[2:4]  # a stop string taken from the reply itself: the reply must end right before it
    cut = client.completions.create(model=server["base"], prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=server["base"], prompt="Once upon a time", max_tokens=MAX_TOKENS,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_api_key_is_enforced(server):
    from openai import AuthenticationError, OpenAI

    wrong = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        wrong.models.list()
    status, _, body = raw(server["port"], "POST", "/v1/chat/completions", b"{}", key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert raw(server["port"], "GET", "/health", key=None)[0] == 200  # health stays open for probes


HUGE = "hello " * 6000  # ~6000 tokens, over the tiny model's 4096-token context
MESSAGES = [{"role": "user", "content": "hi"}]
MALFORMED = [
    # (description, path, body bytes, extra headers, expected status, expected param)
    ("bad JSON", "/v1/chat/completions", b'{"model": "alpha", "messages": [', {}, 400, None),
    ("empty body", "/v1/chat/completions", b"", {}, 400, None),
    ("not valid UTF-8", "/v1/chat/completions", b'{"model": "\xff\xfe"}', {}, 400, None),
    ("JSON array body", "/v1/chat/completions", b"[1, 2]", {}, 400, None),
    ("wrong content type", "/v1/chat/completions", json.dumps({"model": "alpha", "messages": MESSAGES}).encode(),
     {"Content-Type": "text/plain"}, 415, None),
    ("missing messages", "/v1/chat/completions", {"model": "alpha"}, {}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "alpha", "messages": []}, {}, 400, "messages"),
    ("messages not a list", "/v1/chat/completions", {"model": "alpha", "messages": "hi"}, {}, 400, "messages"),
    ("message not an object", "/v1/chat/completions", {"model": "alpha", "messages": ["hi"]}, {}, 400, "messages[0]"),
    ("unknown role", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]},
     {}, 400, "messages[0].role"),
    ("content wrong type", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": 5}]},
     {}, 400, "messages[0].content"),
    ("negative max_tokens", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "max_tokens": -3},
     {}, 400, "max_tokens"),
    ("max_tokens a string", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "max_tokens": "ten"},
     {}, 400, "max_tokens"),
    ("max_tokens a boolean", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "max_tokens": True},
     {}, 400, "max_tokens"),
    ("temperature too high", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "temperature": 7},
     {}, 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "top_p": 0}, {}, 400, "top_p"),
    ("stop a number", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "stop": 3}, {}, 400, "stop"),
    ("stream a string", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "stream": "yes"},
     {}, 400, "stream"),
    ("seed a float", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "seed": 1.5}, {}, 400, "seed"),
    ("n above 1", "/v1/chat/completions", {"model": "alpha", "messages": MESSAGES, "n": 3}, {}, 400, "n"),
    ("missing model", "/v1/chat/completions", {"messages": MESSAGES}, {}, 400, "model"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": MESSAGES}, {}, 404, "model"),
    ("prompt over the context", "/v1/chat/completions",
     {"model": "alpha", "messages": [{"role": "user", "content": HUGE}]}, {}, 400, "messages"),
    ("completion without prompt", "/v1/completions", {"model": "alpha"}, {}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"model": "alpha", "prompt": [1, 10**9]}, {}, 400, "prompt"),
    ("unknown route", "/v1/engines", {"model": "alpha"}, {}, 404, None),
]


def test_malformed_requests_get_4xx_json_errors_and_the_server_stays_healthy(server, client):
    assert len(MALFORMED) >= 12
    for what, path, body, headers, status, param in MALFORMED:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, _, answer = raw(server["port"], "POST", path, data, headers)
        assert got == status, (what, got, answer)
        error = answer["error"]
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"], what
        if param:
            assert error["param"] == param, (what, error)
    got, _, answer = raw(server["port"], "GET", "/v1/chat/completions")
    assert got == 405 and "error" in answer
    assert raw(server["port"], "GET", "/health", key=None)[2]["status"] == "ok"
    assert chat(client, "alpha", "still there?").choices[0].message.content  # and it still answers


def test_32_concurrent_streams_two_rounds_all_complete_and_correct(server, expected):
    from openai import AsyncOpenAI

    questions = [f"Question number {i}: what is {i} + {i}?" for i in range(8)]
    models = ["alpha", "beta"]

    async def one(client, i):
        model, question = models[i % 2], questions[i % len(questions)]
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                      temperature=0, max_tokens=LOAD_TOKENS, stream=True)
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return model, question, text, reason

    async def round_():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0,
                             timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    for _ in range(2):
        results = asyncio.run(round_())
        assert len(results) == 32
        for model, question, text, reason in results:
            assert reason in ("stop", "length")
            assert text == expected(model, question, LOAD_TOKENS), (model, question)


def test_client_disconnect_mid_stream_frees_its_slot(server):
    port = server["port"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "Talk for a long time."}],
                       "stream": True, "max_tokens": 3000, "temperature": 0.8, "seed": 1})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.read(6) == b"data: "  # streaming has begun (read() undoes the chunked encoding)
    assert raw(port, "GET", "/health")[2]["in_flight"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        health = raw(port, "GET", "/health")[2]
        if health["in_flight"] == 0 and health["running"] == 0:
            break
        time.sleep(0.2)
    assert health["in_flight"] == 0 and health["running"] == 0, health  # slot freed and the batch stopped


class FakeBatch:
    """Stands in for the engine's running batch: each step gives every row the token 'x' (after
    waiting for `gate`) and a row ends at its max_new_tokens. `added` logs the admitted prompts."""

    def __init__(self, gate: threading.Event, token: int):
        self.gate, self.token, self.rows, self.added = gate, token, [], []

    def __len__(self):
        return len(self.rows)

    def add(self, prompt, params):
        from lorakit.infer.engine import Sequence

        self.added.append(prompt)
        self.rows.append(Sequence(prompt, params, params.max_new_tokens, frozenset()))
        return self.rows[-1]

    def remove(self, seq):
        self.rows = [s for s in self.rows if s is not seq]

    def step(self):
        self.gate.wait(30)
        time.sleep(0.01)
        stepped = list(self.rows)
        for seq in stepped:
            seq.tokens.append(self.token)
            if len(seq.tokens) >= seq.budget:
                seq.finish_reason = "length"
        self.rows = [s for s in self.rows if s.finish_reason is None]
        return stepped


class FakeEngine:
    def __init__(self, gate: threading.Event, token: int):
        self.gate, self.token, self.batches = gate, token, []

    def batch(self, capacity):
        self.batches.append(FakeBatch(self.gate, self.token))
        return self.batches[-1]


def fake_scheduler(tokenizer, max_concurrency: int, max_queue: int, gate: threading.Event):
    from lorakit.serve_models import Served, ServedModel
    from lorakit.serve_scheduler import Scheduler

    models = {name: ServedModel(name, adapter, None, name) for name, adapter in (("m", None), ("a", "a"), ("b", "b"))}
    engine = FakeEngine(gate, tokenizer.convert_tokens_to_ids("x"))
    return Scheduler(Served(object(), tokenizer, engine, models, 100), max_concurrency, max_queue), models, engine


def make_job(model, loop, prompt=(1, 2), max_tokens: int = 4):
    from lorakit.serve_scheduler import GenerationJob

    return GenerationJob(served=model, prompt=list(prompt), temperature=0.0, top_p=1.0, seed=None, max_tokens=max_tokens,
               stop=[], loop=loop, events=asyncio.Queue())


def wait_idle(scheduler, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while (scheduler.active or scheduler.running) and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.active == 0 and scheduler.running == 0


def test_a_full_queue_answers_503_with_retry_after(qwen_tokenizer):
    """The scheduler admits max_concurrency + max_queue requests; the next gets 503 and Retry-After."""
    from lorakit.serve_api import ApiError

    gate = threading.Event()
    scheduler, models, _ = fake_scheduler(qwen_tokenizer, 2, 1, gate)
    loop = asyncio.new_event_loop()
    jobs = [make_job(models["m"], loop) for _ in range(3)]
    for j in jobs:
        scheduler.submit(j)
    with pytest.raises(ApiError) as info:
        scheduler.submit(make_job(models["m"], loop))
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
    scheduler.release(jobs[0], cancelled=True)  # a client went away: its slot is free again
    scheduler.submit(make_job(models["m"], loop))
    gate.set()
    wait_idle(scheduler)
    loop.close()


@pytest.mark.parametrize("wait", [30.0, 0.0])
def test_requests_for_another_adapter_wait_for_the_batch_to_drain_but_not_forever(qwen_tokenizer, monkeypatch, wait):
    """Rows share one adapter. A request for the running adapter overtakes one waiting for another
    adapter while that one has waited less than ADAPTER_WAIT; after that it waits its turn."""
    from lorakit import serve_scheduler

    monkeypatch.setattr(serve_scheduler, "ADAPTER_WAIT", wait)
    gate = threading.Event()
    scheduler, models, engine = fake_scheduler(qwen_tokenizer, 4, 4, gate)
    loop = asyncio.new_event_loop()
    scheduler.submit(make_job(models["a"], loop, [1]))
    deadline = time.time() + 10
    while not (engine.batches and engine.batches[0].added) and time.time() < deadline:
        time.sleep(0.005)  # the first request is running
    scheduler.submit(make_job(models["b"], loop, [2]))
    scheduler.submit(make_job(models["a"], loop, [3]))
    time.sleep(0.05)
    gate.set()
    wait_idle(scheduler)
    expected = [[1], [3], [2]] if wait else [[1], [2], [3]]
    assert engine.batches[0].added == expected
    loop.close()


def test_a_request_joins_the_running_batch_and_finishes_first(qwen_tokenizer):
    """Step-level admission: a short request sent while a long one streams is admitted at the next
    step and gets its whole reply, the same as alone, before the long one ends."""
    import torch

    from lorakit.data.render import render_prompt
    from lorakit.infer.engine import Engine, SamplingParams
    from lorakit.serve_models import Served, ServedModel
    from lorakit.serve_scheduler import Delta, Finished, Scheduler
    from test_engine import _model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _model()
    engine = Engine(model, qwen_tokenizer, fast=False)
    engine.stop_ids = set()  # random weights: every reply runs to its max_tokens
    served = ServedModel("m", None, None, "m")
    scheduler = Scheduler(Served(model, qwen_tokenizer, engine, {"m": served}, 4096), 4, 4)
    long_prompt, short_prompt = (render_prompt(qwen_tokenizer, [{"role": "user", "content": q}])
                                 for q in ("Tell me everything.", "Hi"))
    finished: list[str] = []

    async def collect(job, name, text=""):
        while True:
            event = await job.events.get()
            if isinstance(event, Finished):
                finished.append(name)
                return text, event
            text += event.text

    async def main():
        loop = asyncio.get_running_loop()
        long, short = make_job(served, loop, long_prompt, 80), make_job(served, loop, short_prompt, 6)
        scheduler.submit(long)
        first = await long.events.get()
        assert isinstance(first, Delta)  # the long reply is streaming
        scheduler.submit(short)
        return await asyncio.gather(collect(short, "short"), collect(long, "long", first.text))

    try:
        (short_text, short_done), (long_text, long_done) = asyncio.run(main())
        assert finished == ["short", "long"]
        assert short_done == Finished("length", len(short_prompt), 6) and long_done.completion_tokens == 80
        params = SamplingParams(max_new_tokens=6)
        assert short_text == engine.generate([short_prompt], params)[0].text
        assert long_text == engine.generate([long_prompt], SamplingParams(max_new_tokens=80))[0].text
    finally:
        torch.set_num_threads(threads)
