"""LoRA dropout's A product on the GPU (GPU kernel time per forward + backward): the in-kernel mask (fast/lora_dropout.py) against the same math as
compiled torch ops (F.dropout then the product: what the compiled training step ran before), forward +
backward, at the Qwen2.5-7B shapes of one packed 4096-token row. Also checks the kernels against the torch
reference built on the same mask.

    python bench/lora_dropout_gpu.py [--json out.json] [--sweep]   (--sweep: each kernel's time per block shape)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.fast import lora_dropout  # noqa: E402


def torch_ops(x, a, p):
    return F.linear(F.dropout(x, p, training=True), a.to(x.dtype))


def timed(fn, x, a, grad, steps=20) -> float:
    """GPU ms per forward + backward: the kernels' own time from the profiler (in a training step the host
    runs ahead, so launch overhead, which dominates wall time at these sizes, is hidden)."""
    for _ in range(5):
        x.grad = a.grad = None
        fn(x, a).backward(grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            x.grad = a.grad = None
            fn(x, a).backward(grad)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / steps


def check(rows: int, cols: int, rank: int, p: float) -> dict:
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(rank, cols, device="cuda") * 0.02
    dxa = torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([1234], dtype=torch.int32, device="cuda")
    keep = lora_dropout.keep_mask(1234, rows, cols, p, device="cuda")
    dropped = torch.where(keep, x * (1 / (1 - p)), 0).to(x.dtype)
    out = lora_dropout.dropped_lora_a(x, a, seed, p)
    dx, ga = lora_dropout.dropped_lora_a_backward(dxa, x, a, seed, p)
    ref_out = dropped @ a.to(x.dtype).t()
    ref_ga = dxa.float().t() @ dropped.float()
    ref_dx = torch.where(keep, (dxa @ a.to(x.dtype)).float() / (1 - p), 0)
    rel = lambda got, ref: ((got.float() - ref.float()).norm() / ref.float().norm()).item()  # noqa: E731
    return {"keep_share": keep.float().mean().item(), "rel_err_out": rel(out, ref_out),
            "rel_err_grad_a": rel(ga, ref_ga), "rel_err_dx": rel(dx, ref_dx)}


SWEEP = {"product": [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (16, 128, 4), (128, 64, 8)],
         "grad_x": [(64, 64, 4), (64, 128, 4), (128, 128, 8), (32, 128, 4), (128, 64, 4), (32, 64, 4)],
         "grad_a": [(32, 128, 4), (64, 128, 4), (64, 64, 4), (32, 256, 8), (128, 128, 8), (16, 128, 4)]}


def sweep(rows: int, cols: int, rank: int, p: float) -> dict:
    """GPU us per call of each kernel under each block shape of SWEEP (the i-th shapes of all three together)."""
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(rank, cols, device="cuda") * 0.02).requires_grad_()
    grad = torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16)
    default = dict(lora_dropout.BLOCKS)
    times: dict[str, dict[str, float]] = {name: {} for name in SWEEP}
    for i in range(len(SWEEP["product"])):
        lora_dropout.BLOCKS.update({name: shapes[i] for name, shapes in SWEEP.items()})
        for _ in range(3):
            lora_dropout.lora_a_through_dropout(x, a, p).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                lora_dropout.lora_a_through_dropout(x, a, p).backward(grad)
            torch.cuda.synchronize()
        for event in prof.key_averages():
            for name in SWEEP:
                if f"_{name}_kernel" in event.key:
                    times[name][str(SWEEP[name][i])] = round(event.self_device_time_total / 10, 2)
    lora_dropout.BLOCKS.update(default)
    return {"cols": cols, "us_per_call": times, "best": {n: min(t, key=t.get) for n, t in times.items() if t}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--json")
    parser.add_argument("--sweep", action="store_true")
    opts = parser.parse_args()
    if opts.sweep:
        found = [sweep(opts.rows, cols, opts.rank, opts.p) for cols in (3584, 18944)]
        for row in found:
            print(json.dumps(row), flush=True)
        if opts.json:
            Path(opts.json).write_text(json.dumps(found, indent=1))
        return
    compiled = torch.compile(torch_ops)
    results = []
    for cols in (3584, 18944):  # attention/gate/up input width; down_proj's input width
        x = torch.randn(opts.rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        a = (torch.randn(opts.rank, cols, device="cuda") * 0.02).requires_grad_()
        grad = torch.randn(opts.rows, opts.rank, device="cuda", dtype=torch.bfloat16)
        ops_ms = timed(lambda x, a: compiled(x, a, opts.p), x, a, grad)
        kernel_ms = timed(lambda x, a: lora_dropout.lora_a_through_dropout(x, a, opts.p), x, a, grad)
        none_ms = timed(lambda x, a: F.linear(x, a.to(x.dtype)), x, a, grad)
        row = {"cols": cols, "rank": opts.rank, "rows": opts.rows, "compiled_torch_ops_ms": round(ops_ms, 4),
               "kernels_ms": round(kernel_ms, 4), "no_dropout_ms": round(none_ms, 4),
               "speedup_vs_torch_ops": round(ops_ms / kernel_ms, 3)} | check(opts.rows, cols, opts.rank, opts.p)
        print(json.dumps(row), flush=True)
        results.append(row)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
