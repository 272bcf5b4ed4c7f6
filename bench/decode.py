"""Decode benchmark: lorakit's engine against Hugging Face `generate` on the Qwen2.5-7B architecture.

Random bf16 weights are built directly on the GPU (no download). Prompt 512 tokens, 256 new
tokens, greedy. Reports single-stream decode tokens/s, time to first token, batch-16 aggregate
tokens/s, and HF `generate` timed in the same process; and checks the fast path's tokens:
- exactly, against the reference decoder, on a 2-layer float32 model of the same width
  (float32 keeps numerical noise far below the gaps between the top logits), for a ragged batch
  and for rows joining and leaving a running batch (`--exact_only` runs just these checks);
- on the 7B bf16 model, by teacher forcing: one HF forward over prompt + fast reply must rank
  each fast token first, or within bf16 noise of first.

Run on the device machine:  python bench/decode.py --out $OUT
Smoke test on a CPU:        python bench/decode.py --tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakit.infer.engine import Engine, SamplingParams  # noqa: E402
from qwen_arch import QWEN25_7B as QWEN_7B, TINY, build_random_qwen2 as build_model  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_engine(engine: Engine, prompts, params, device, repeats: int) -> dict:
    """Median over `repeats` runs of: time to first token, decode tokens/s, end-to-end tokens/s."""
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        steps = engine.steps(prompts, params)
        seqs = next(steps)
        first = time.perf_counter()
        for seqs in steps:
            pass
        sync(device)
        end = time.perf_counter()
        new = sum(len(s.tokens) for s in seqs)
        runs.append(dict(ttft_ms=(first - start) * 1e3, decode_tok_s=(new - len(prompts)) / (end - first),
                         e2e_tok_s=new / (end - start), tokens=[s.tokens for s in seqs]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tok_s", "e2e_tok_s")}
    return {**med, "tokens": runs[-1]["tokens"], "new_tokens": sum(len(t) for t in runs[-1]["tokens"])}


def time_hf_generate(model, prompts, new_tokens: int, device) -> dict:
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - start
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return dict(tok_s=n / seconds, seconds=seconds, tokens=out[:, ids.shape[1]:].tolist())


def exact_check(tokenizer, device, settings: dict, compile: bool, graphs: bool) -> dict:
    """Fast path vs reference decoder, float32, ragged batch: the tokens must be identical; then
    both decoders with rows joining and leaving a running batch."""
    model = build_model(dict(settings, num_hidden_layers=2), torch.float32, device, weight_std=0.05)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 150000, (n,), generator=gen).tolist() for n in (37, 120, 5, 300)]
    params = SamplingParams(max_new_tokens=48)
    reference = Engine(model, tokenizer, fast=False)
    ref = reference.generate(prompts, params)
    fast_engine = Engine(model, tokenizer, fast=True, compile=compile, cuda_graphs=graphs)
    fast = fast_engine.generate(prompts, params)
    same = [a.token_ids == b.token_ids for a, b in zip(ref, fast)]
    alone = [g.token_ids for g in ref]
    joined = continuous_check(fast_engine, prompts, params, alone)
    joined_reference = continuous_check(reference, prompts, params, alone)
    del model, fast_engine
    return dict(identical=all(same), rows=len(same), tokens_per_row=params.max_new_tokens, **joined,
                reference_continuous_identical=joined_reference["continuous_identical"])


def continuous_check(engine: Engine, prompts, params, alone: list[list[int]]) -> dict:
    """Rows joining a running batch at steps 0, 5, 11 and 15 and one leaving at step 20 get the
    reference's tokens of each prompt generated alone. The fast decoder's cache starts at 256
    columns; the 300-token prompt joining at step 15 makes it grow under 4 running rows (a new
    graph)."""
    batch = engine.batch(5)
    seqs, step = [], 0
    joins = {0: prompts[0], 5: prompts[1], 11: prompts[2], 15: prompts[3]}
    dropped = None
    while len(batch) or step in joins:
        if step in joins:
            seqs.append(batch.add(joins[step], params))
        if step == 11:
            dropped = batch.add(prompts[0], params)
        if step == 20:
            batch.remove(dropped)
        batch.step()
        step += 1
    expected = [a[:len(s.tokens)] for a, s in zip(alone, seqs)]
    state = engine._fast.state if engine._fast else None
    return dict(continuous_identical=[s.tokens for s in seqs] == expected and all(len(s.tokens) == len(a) or
                                      s.finish_reason == "stop" for s, a in zip(seqs, alone)),
                continuous_dropped_prefix_ok=dropped.tokens == alone[0][:len(dropped.tokens)],
                continuous_uses_graph=state is not None and bool(state.graphs),
                continuous_cache_length=state.length if state else None)


def teacher_forced_check(model, prompt: list[int], reply: list[int], device) -> dict:
    """Rank of each fast-path token in one HF forward over prompt + reply."""
    ids = torch.tensor([prompt + reply], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(-1, torch.tensor(reply, device=device)[:, None])[:, 0]
    gap = logits.max(-1).values - chosen
    return dict(argmax_agree=float((gap == 0).float().mean()), max_gap=float(gap.max()),
                logit_std=float(logits.std()), positions=len(reply))


def _graph_ms(fn, replays: int) -> float:
    """Median-free simple timing: capture `fn` once in a CUDA graph, replay, ms per replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


@torch.inference_mode()
def graph_step_ms(engine: Engine, prompt_len: int, replays: int = 100) -> float | None:
    """GPU time of one decode step alone: replay the captured graph (state reset to a valid slot)."""
    state = engine._fast.state
    if state is None or not state.graphs:
        return None
    graph, _ = state.graphs[max(state.graphs)]  # the widest captured step: what the reply's last tokens run
    replays = min(replays, state.mask.shape[1] - prompt_len - 2)
    # The step advances slot and positions on the GPU: start both where a reply starts, so every
    # replay stays inside the cache and the rotary table.
    state.slot.fill_(prompt_len)
    state.positions.fill_(prompt_len)
    graph.replay()
    torch.cuda.synchronize()
    state.slot.fill_(prompt_len)
    state.positions.fill_(prompt_len)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


@torch.inference_mode()
def diagnostics(engine: Engine, rows: int) -> dict:
    """Where a step's time goes: the matrix products alone, the attention alone, copy bandwidth."""
    import torch.nn.functional as F

    fast = engine._fast
    dev, dtype = fast.embed.device, fast.embed.dtype
    weights = [w for layer in fast.layers for w in (layer.attn_in[1], layer.attn_out[0], layer.attn_out[3],
                                                      layer.attn_out[5], layer.attn_out[7])] + [fast.head]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=dev, dtype=dtype) for w in weights}

    def x_for(w):
        return inputs[w.shape[1]]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    out = dict(matmul_ms=_graph_ms(lambda: [F.linear(x_for(w), w) for w in weights], 20),
               weight_gb=weight_bytes / 1e9)
    state = fast.state
    q = torch.randn(rows, fast.n_kv, fast.n_heads // fast.n_kv, fast.head_dim, device=dev, dtype=dtype)
    mask = state.mask[:rows, None, None, :]
    out["attention_ms"] = _graph_ms(lambda: [F.scaled_dot_product_attention(q, kv[0, :rows], kv[1, :rows], attn_mask=mask)
                                             for kv in state.kv], 20)
    big = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    ms = _graph_ms(lambda: dst.copy_(big), 10)
    out["copy_tb_s"] = 2 * big.numel() / (ms / 1e3) / 1e12
    del big, dst
    out["bandwidth_floor_ms"] = weight_bytes / (out["copy_tb_s"] * 1e12) * 1e3
    return out


@torch.inference_mode()
def first_step_logit_error(model, engine: Engine, prompt: list[int], device) -> dict:
    """Relative L2 error of the first decoded logits vs one HF forward over prompt + token, for the
    fast decoder and (as the bf16 noise baseline) the reference decoder."""
    from lorakit.infer.engine import ReferenceDecoder, left_pad

    batch = left_pad([prompt], 0, device)
    out = {}
    token = engine._fast.prefill(batch, 8).argmax(-1)
    for name, decoder in (("fast", engine._fast), ("reference", ReferenceDecoder(model))):
        decoder.prefill(batch, 8)
        out[name] = decoder.step(token)[0].float().clone()
    full = model(input_ids=torch.tensor([prompt + [int(token)]], device=device)).logits[0, -1].float()
    return {f"{k}_rel_err": float((v - full).norm() / full.norm()) for k, v in out.items()}


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure_variants(model, tokenizer, prompts, params, hf1, device, args, results, save):
    """Batch-1 runs of the fast decoder with a CUDA graph, without and with torch.compile (default mode)."""
    on_gpu = device.type == "cuda"
    variants = [("graph", dict(compile=False, cuda_graphs=on_gpu)), ("graph+compile", dict(compile=on_gpu, cuda_graphs=on_gpu))]
    engine = single = None
    for name, flags in variants:
        try:
            engine = Engine(model, tokenizer, fast=True, **flags)
            engine.stop_ids = set()  # random weights: always generate the full 256 tokens
            t0 = time.perf_counter()
            time_engine(engine, prompts[:1], params, device, repeats=1)  # warm-up: compile + capture
            results[f"{name}_warmup_s"] = time.perf_counter() - t0
            single = time_engine(engine, prompts[:1], params, device, args.repeats)
            results[f"{name}_bs1"] = {k: v for k, v in single.items() if k != "tokens"}
            results[f"{name}_bs1_prefix_match_hf"] = prefix_match(single["tokens"][0], hf1["tokens"][0])
            results[f"{name}_bs1_teacher_forced"] = teacher_forced_check(model, prompts[0], single["tokens"][0], device)
            if on_gpu:
                results[f"{name}_bs1_graph_step_ms"] = graph_step_ms(engine, args.prompt_len)
                if name == "graph+compile":
                    results["bs1_diagnostics"] = diagnostics(engine, 1)
                    results["first_step_logits"] = first_step_logit_error(model, engine, prompts[0], device)
        except Exception as e:  # keep the other measurements of this (scarce) run
            results[f"{name}_error"] = repr(e)
            traceback.print_exc()
        save()
    return engine, single


def measure_batch(engine, single, prompts, params, device, args, results) -> None:
    """Aggregate throughput at --batch with the compiled engine."""
    try:
        time_engine(engine, prompts, params, device, repeats=1)  # warm-up at this batch size
        batch = time_engine(engine, prompts, params, device, max(1, args.repeats - 1))
        results[f"graph+compile_bs{args.batch}"] = {k: v for k, v in batch.items() if k != "tokens"}
        results[f"graph+compile_bs{args.batch}_row0_prefix_match_bs1"] = prefix_match(batch["tokens"][0], single["tokens"][0])
        if device.type == "cuda":
            results[f"graph+compile_bs{args.batch}_graph_step_ms"] = graph_step_ms(engine, args.prompt_len)
            results[f"bs{args.batch}_diagnostics"] = diagnostics(engine, args.batch)
    except Exception as e:
        results["batch_error"] = repr(e)
        traceback.print_exc()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test of this script)")
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_hf_batch", action="store_true")
    parser.add_argument("--exact_only", action="store_true", help="only the fp32 fast == reference checks")
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    on_gpu = device.type == "cuda"
    settings = TINY if args.tiny else QWEN_7B
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer")
    results: dict = dict(date=time.strftime("%Y-%m-%d", time.gmtime()), torch=torch.__version__,
                         device=torch.cuda.get_device_name() if on_gpu else "cpu")
    import transformers

    results["transformers"] = transformers.__version__
    out_dir = Path(args.out) if args.out else None

    def save():
        print(json.dumps({k: v for k, v in results.items() if k != "tokens"}, indent=1), flush=True)
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    start_all = t0 = time.perf_counter()
    results["exact_fp32"] = exact_check(tokenizer, device, settings, compile=on_gpu, graphs=on_gpu)
    results["exact_fp32_seconds"] = time.perf_counter() - t0
    save()
    exact = results["exact_fp32"]
    ok = all(exact[k] for k in ("identical", "continuous_identical", "continuous_dropped_prefix_ok",
                                "reference_continuous_identical"))
    if args.exact_only:
        return 0 if ok else 1

    model = build_model(settings, torch.bfloat16 if on_gpu else torch.float32, device)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 150000, (args.batch, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens)
    with torch.inference_mode():
        hf1 = time_hf_generate(model, prompts[:1], args.new_tokens, device)
    results["hf_generate_bs1_tok_s"] = hf1["tok_s"]
    results["hf_generate_bs1_teacher_forced"] = teacher_forced_check(model, prompts[0], hf1["tokens"][0], device)
    save()

    engine, single = measure_variants(model, tokenizer, prompts, params, hf1, device, args, results, save)
    measure_batch(engine, single, prompts, params, device, args, results)
    save()
    if not args.skip_hf_batch:
        with torch.inference_mode():
            hfb = time_hf_generate(model, prompts, args.new_tokens, device)
        results[f"hf_generate_bs{args.batch}_tok_s"] = hfb["tok_s"]
        save()
    print_table(results, args)
    if on_gpu and time.perf_counter() - start_all < 200:
        autotuned_variant(model, tokenizer, prompts, params, device, args, results)
        save()
        print_table(results, args)
    return 0 if ok else 1


def autotuned_variant(model, tokenizer, prompts, params, device, args, results) -> None:
    """Experiment: the same step compiled with mode='max-autotune-no-cudagraphs' (Triton GEMV templates)."""
    try:
        engine = Engine(model, tokenizer, fast=True, compile="max-autotune-no-cudagraphs", cuda_graphs=True)
        engine.stop_ids = set()
        t0 = time.perf_counter()
        time_engine(engine, prompts[:1], params, device, repeats=1)
        results["autotune_warmup_s"] = time.perf_counter() - t0
        single = time_engine(engine, prompts[:1], params, device, args.repeats)
        results["autotune_bs1"] = {k: v for k, v in single.items() if k != "tokens"}
        results["autotune_bs1_graph_step_ms"] = graph_step_ms(engine, args.prompt_len)
    except Exception as e:
        results["autotune_error"] = repr(e)
        traceback.print_exc()


def print_table(r: dict, args) -> None:
    b = args.batch
    nan = float("nan")

    def get(key, field=None):
        value = r.get(key, {} if field else nan)
        return value.get(field, nan) if field else value

    rows = [
        ("HF generate, bs1 (tok/s)", get("hf_generate_bs1_tok_s")),
        ("lorakit graph only, bs1 decode (tok/s)", get("graph_bs1", "decode_tok_s")),
        ("lorakit graph+compile, bs1 decode (tok/s)", get("graph+compile_bs1", "decode_tok_s")),
        ("lorakit graph+max-autotune compile, bs1 decode (tok/s)", get("autotune_bs1", "decode_tok_s")),
        ("graph+compile bs1: GPU time of one step (ms)", get("graph+compile_bs1_graph_step_ms")),
        ("lorakit graph+compile, bs1 end-to-end (tok/s)", get("graph+compile_bs1", "e2e_tok_s")),
        (f"lorakit time to first token, {args.prompt_len}-token prompt (ms)", get("graph+compile_bs1", "ttft_ms")),
        (f"HF generate, bs{b} aggregate (tok/s)", get(f"hf_generate_bs{b}_tok_s")),
        (f"lorakit graph+compile, bs{b} aggregate end-to-end (tok/s)", get(f"graph+compile_bs{b}", "e2e_tok_s")),
        (f"lorakit graph+compile, bs{b} aggregate decode (tok/s)", get(f"graph+compile_bs{b}", "decode_tok_s")),
        (f"graph+compile bs{b}: GPU time of one step (ms)", get(f"graph+compile_bs{b}_graph_step_ms")),
        ("fast == reference, fp32 2-layer, ragged batch", get("exact_fp32", "identical")),
        ("  same, rows joining / leaving a running batch", get("exact_fp32", "continuous_identical")),
        ("bf16 7B teacher-forced argmax agreement", get("graph+compile_bs1_teacher_forced", "argmax_agree")),
        ("  same for HF generate's own tokens", get("hf_generate_bs1_teacher_forced", "argmax_agree")),
        ("first decode step logits rel. error: fast", get("first_step_logits", "fast_rel_err")),
        ("first decode step logits rel. error: reference", get("first_step_logits", "reference_rel_err")),
        ("bs1: all matmuls alone (ms) / bandwidth floor (ms)",
         f"{get('bs1_diagnostics', 'matmul_ms'):.2f} / {get('bs1_diagnostics', 'bandwidth_floor_ms'):.2f}"),
        ("bs1: attention alone, 28 layers (ms)", get("bs1_diagnostics", "attention_ms")),
        ("copy bandwidth (TB/s)", get("bs1_diagnostics", "copy_tb_s")),
        ("bf16 7B tokens equal to HF generate (prefix)", get("graph+compile_bs1_prefix_match_hf")),
    ]
    print(f"\nDecode benchmark, {r['date']}, {r['device']}, torch {r['torch']}, transformers {r['transformers']}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    width = max(len(a) for a, _ in rows)
    for name, value in rows:
        text = f"{value:.3f}" if isinstance(value, float) and not isinstance(value, bool) else str(value)
        print(f"| {name:<{width}} | {text:>10} |")


if __name__ == "__main__":
    sys.exit(main())
