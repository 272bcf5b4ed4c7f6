"""Where a GRPO rollout's time goes: the fast decoder over a live LoRA adapter on the Qwen2.5-7B architecture.

GRPO's rollout is 64 rows (8 prompts x 8 completions) sampled for 512 tokens with the adapter unmerged
(`Engine(..., live_adapter=True)`, as `lorakit rlhf --rlhf_type grpo` builds it). This prints, in one process:
- the whole rollout (`Engine.generate`, sampling at temperature 1, ignore_eos) in ms per decode step;
- the decode step alone (the captured CUDA graph replayed with no sampling and no host work);
- the same 64-row sampling (`sample_tokens`) alone;
- the top kernels of a profiled stretch of the rollout (CUDA time per step).
The gap between the first and the sum of the others is the host's share.

    python bench/rollout_profile.py [--compile default|max-autotune-no-cudagraphs|none] [--rows 64 --new 512]
    python bench/rollout_profile.py --tiny      # CPU dry run of this script's own logic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lorakit.infer.engine import Engine, SamplingParams  # noqa: E402
from lorakit.infer.fast_decode import attended_width  # noqa: E402
from lorakit.infer.sampling import _race, race, sample_tokens, stream_steps  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, repeats: int = 1) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=70)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compile", default="default", help="default | max-autotune-no-cudagraphs | none")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    device = torch.device("cpu" if opts.tiny else "cuda")
    dtype = torch.float32 if opts.tiny else torch.bfloat16
    if opts.tiny:
        opts.rows, opts.new, opts.prompt = 4, 8, 12
    model = build_random_qwen2(TINY if opts.tiny else QWEN25_7B, dtype, device)
    model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, lora_dropout=0.0,
                                             target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)  # a trained adapter: not the zero B of a fresh one
    model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    compile = {"default": True, "none": False}.get(opts.compile, opts.compile)
    engine = Engine(model, tokenizer, live_adapter=True, max_batch_size=opts.rows, compile=compile,
                    fast=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (opts.prompt,), generator=gen).tolist() for _ in range(opts.rows)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=opts.new, ignore_eos=True, seed=i)
              for i in range(opts.rows)]
    report: dict = {"config": vars(opts), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    first = timed(device, lambda: engine.generate(prompts, params))
    report["first_generate_s"] = round(first, 2)
    print(f"first rollout (compile + capture): {first:.1f} s", flush=True)
    whole = timed(device, lambda: engine.generate(prompts, params))
    report["generate_ms_per_step"] = round(1e3 * whole / opts.new, 3)
    print(f"rollout: {whole:.2f} s = {report['generate_ms_per_step']} ms per step", flush=True)

    state = engine._fast.state
    report["decode_step_ms_by_width"] = {}
    for width in sorted(state.graphs) or [state.length]:
        step = (lambda: state.graphs[width][0].replay()) if state.graphs else (
            lambda: engine._fast.decode_step(state, width))
        with torch.inference_mode():
            report["decode_step_ms_by_width"][width] = round(1e3 * timed(device, step, repeats=64), 3)
    # the rollout's steps by width: prompt + k columns in use at step k
    used = [attended_width(opts.prompt + k + 1, state.length) for k in range(opts.new)]
    replay = sum(report["decode_step_ms_by_width"].get(w, 0.0) for w in used) / opts.new / 1e3
    report["decode_step_ms"] = round(1e3 * replay, 3)
    print(f"decode step alone ({'graph replay' if state.graphs else 'eager'}), by attended width: "
          f"{report['decode_step_ms_by_width']} -> {report['decode_step_ms']} ms on average over the rollout; "
          f"cache {state.rows} rows x {state.length} columns", flush=True)

    logits = torch.randn(opts.rows, model.config.vocab_size, device=device)
    seeds, draws = torch.arange(opts.rows, device=device), torch.full((opts.rows,), 5, device=device)
    with torch.inference_mode():
        sample_tokens(logits, params, seeds, draws)  # compiles the race on CUDA
        sampling = timed(device, lambda: sample_tokens(logits, params, seeds, draws), repeats=50)
        compiled = race(logits, seeds, draws)
        report["race_compiled_equals_eager"] = bool(torch.equal(compiled, _race(logits, seeds, draws, stream_steps(
            logits.shape[-1], device))))
    print(f"compiled race picks == eager race picks: {report['race_compiled_equals_eager']}", flush=True)
    report["sample_ms"] = round(1e3 * sampling, 3)
    print(f"sample_tokens alone ({opts.rows} rows): {report['sample_ms']} ms", flush=True)
    report["host_share_ms"] = round(report["generate_ms_per_step"] - report["decode_step_ms"] - report["sample_ms"], 3)
    print(f"left for the host and gaps: {report['host_share_ms']} ms per step", flush=True)

    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        short = [SamplingParams(temperature=1.0, max_new_tokens=64, ignore_eos=True, seed=i) for i in range(opts.rows)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(prompts, short)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        print(table, flush=True)
        report["profile_top"] = table
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
