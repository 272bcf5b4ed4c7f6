"""Serving benchmark: `lorakit deploy`'s HTTP server on the Qwen2.5-7B architecture (random bf16 weights).

The real FastAPI app and scheduler run under uvicorn on 127.0.0.1 in this process; 16 client
threads each send streaming chat requests back to back over HTTP (stdlib http.client, SSE parsed
by hand). Reports aggregate completion tokens/s over the measured phase, p50/p95 request latency
and time to first token, and a single-client run for comparison.

Run on the device machine:  python bench/serve.py --out $OUT
Smoke test on a CPU:        python bench/serve.py --tiny

Measured 2026-11-23 on one H100 80GB (--per_client 3: 48 requests, ~100-word prompts, 128 new tokens
each, greedy, engine fast path with CUDA graphs, continuous batching: one running batch of 16 rows,
requests admitted between decode steps): 16 concurrent clients 1,891 completion tok/s aggregate,
request latency p50 1.07 s / p95 1.10 s, time to first token p50 0.22 s / p95 0.24 s; one client
alone 144 tok/s (0.86 s per 128-token reply; the graph always runs 16 rows, which at this size
costs about as much as one). The first requests take 50 s (compile + graph capture, once).
Results: experiments/results/serve-h100-2026-11-23.json.
Before (2026-11-22, one batch at a time, later requests waiting for the whole batch): 783 tok/s,
latency p50 2.44 s / p95 3.01 s, TTFT p50 1.52 s / p95 2.10 s, one client 148 tok/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.infer.engine import Engine  # noqa: E402
from lorakit.model import load_tokenizer  # noqa: E402
from lorakit.serve import Scheduler, Served, ServedModel, build_app  # noqa: E402
from qwen_arch import QWEN25_7B as QWEN_7B, TINY, build_random_qwen2 as build_model  # noqa: E402

NAME = "qwen2.5-7b-arch-random"


def start_server(served: Served, concurrency: int) -> tuple[int, object]:
    """uvicorn serving the app on a free loopback port, in a background thread."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(served, Scheduler(served, concurrency, 4 * concurrency), api_key=None, default_max_tokens=128)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return port, server


def stream_request(port: int, question: str, max_tokens: int) -> dict:
    """One streaming chat request; returns latency, time to first token and completion tokens."""
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": question}], "stream": True,
                       "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens, done = None, 0, False
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    if not done:
        raise RuntimeError("stream ended without data: [DONE]")
    return {"latency_s": end - start, "ttft_s": (first or end) - start, "tokens": tokens}


def run_clients(port: int, clients: int, per_client: int, max_tokens: int, prompt_words: int) -> dict:
    """`clients` threads, each sending `per_client` requests back to back; aggregate figures."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(cid: int) -> None:
        for r in range(per_client):
            question = f"Client {cid} request {r}: " + " ".join(f"word{(cid * 7 + r + i) % 97}" for i in range(prompt_words))
            try:
                out = stream_request(port, question, max_tokens)
            except Exception as exc:  # report, do not hide, failed requests
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r["latency_s"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"clients": clients, "requests": len(results), "errors": errors[:5], "error_count": len(errors),
            "wall_s": wall, "completion_tokens": tokens, "aggregate_tok_s": tokens / wall,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "mean_tokens_per_request": statistics.mean(r["tokens"] for r in results) if results else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU (smoke test)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per_client", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--prompt_words", type=int, default=100)
    parser.add_argument("--fast", choices=("auto", "off"), default="auto",
                        help="auto: the engine's static-cache CUDA-graph decoder where it can run; off: reference decoder")
    parser.add_argument("--out", type=str, default=None, help="folder for serve_bench_fast_{auto,off}.json")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(TINY if args.tiny else QWEN_7B, dtype, device)
    tokenizer = load_tokenizer(ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer")
    engine = Engine(model, tokenizer, max_batch_size=args.clients, fast=None if args.fast == "auto" else False)
    served = Served(model, tokenizer, engine, {NAME: ServedModel(NAME, None, None, "random")},
                    model.config.max_position_embeddings)
    port, server = start_server(served, args.clients)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "model": "tiny" if args.tiny else "Qwen2.5-7B architecture, random bf16 weights",
              "fast_decode_path": engine.uses_fast_path, "fast_note": engine.fast_note,
              "max_tokens": args.max_tokens, "prompt_words": args.prompt_words}
    t = time.perf_counter()
    report["warmup"] = run_clients(port, args.clients, 1, args.max_tokens, args.prompt_words)  # compile, graphs
    report["warmup"]["seconds"] = time.perf_counter() - t
    report["single_client"] = run_clients(port, 1, 2, args.max_tokens, args.prompt_words)
    report["concurrent"] = run_clients(port, args.clients, args.per_client, args.max_tokens, args.prompt_words)
    if device.type == "cuda":
        report["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    server.should_exit = True
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"serve_bench_fast_{args.fast}.json").write_text(text + "\n")
    c = report["concurrent"]
    print(f"\n{args.clients} concurrent clients: {c['aggregate_tok_s']:.0f} tok/s aggregate, latency p50 "
          f"{c['latency_p50_s']:.2f}s p95 {c['latency_p95_s']:.2f}s, TTFT p50 {c['ttft_p50_s']:.2f}s; "
          f"1 client: {report['single_client']['aggregate_tok_s']:.0f} tok/s")
    return 0 if c["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
