"""lorakit's training step under torchrun: DDP overhead with one process, and FSDP2 full fine-tuning on one GPU.

Run under torchrun (NCCL on GPUs, gloo on the CPU):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --standalone --nproc_per_node 1 bench/dist_gpu.py [--json out.json]
    torchrun --standalone --nproc_per_node 1 bench/dist_gpu.py --smoke      # CPU, tiny model, gloo

1. LoRA (Qwen2.5-7B architecture, random bf16 weights, r16 on all linear layers, one 4096-token
   row per step): the sft loop's own `optimizer_step` timed plain (no wrapper), then through
   lorakit.distributed's DDP wrapper (process group of one, the loop's all-reduces and comm hook),
   then plain again; the ratio DDP / best plain is the figure (target >= 0.95).
2. Full fine-tuning (Qwen2.5-1.5B shape): the same step plain, then FSDP2 fully_shard per decoder
   layer (and with CPU offload), tok/s and peak memory; then the gathered checkpoint state (seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorakit import distributed  # noqa: E402
from lorakit.args import FastOptions, LoraArgs, SftArgs, TrainArgs  # noqa: E402
from lorakit.data.render import Rendered  # noqa: E402
from lorakit.fast import prepare_for_training  # noqa: E402
from lorakit.schedule import plan_steps  # noqa: E402
from lorakit.loop import build_optimizer, optimizer_step  # noqa: E402
from lorakit.run_state import TrainingRun  # noqa: E402
from lorakit.run_log import RunLog  # noqa: E402
from lorakit.train import make_loss_fn  # noqa: E402
from lorakit.tuners import attach_tuner  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402

QWEN25_1_5B = dict(QWEN25_7B, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
GIB = 2**30


@dataclass
class Timing:
    name: str
    tok_s: float = 0.0
    peak_gib: float = 0.0
    loss: float = float("nan")
    note: str = ""


class StubTokenizer:
    """What optimizer_step reads from a tokenizer (random token rows need no real one)."""

    pad_token_id = 0


def rows(n: int, seq: int, vocab: int) -> list[Rendered]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (seq,), generator=g).tolist()
        out.append(Rendered(input_ids=ids, labels=list(ids), teacher=None))
    return out


def session(model, args: SftArgs, samples, device, par) -> TrainingRun:
    plan = plan_steps(len(samples), batch_size=1, grad_accum=par.env.world_size, epochs=1, max_steps=10_000,
                      seed=0)
    log = RunLog(Path(tempfile.mkdtemp()), {}, writes=False)
    return TrainingRun(args=args, log=log, model=model, tokenizer=StubTokenizer(),
                   optimizer=build_optimizer(model, args, 1e-5), plan=plan, train_samples=samples, val_samples=[],
                   device=device, loss_fn=make_loss_fn(device, args), learning_rate=1e-5, warmup=0, par=par)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(name: str, s: TrainingRun, steps: int, warmup: int, tokens_per_step: int) -> Timing:
    r = Timing(name)
    device = s.device
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            loss, _, _ = optimizer_step(s)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            r.loss = loss
        med = sorted(times)[len(times) // 2]
        r.tok_s = tokens_per_step * s.par.env.world_size / med
        r.peak_gib = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    except Exception as exc:  # noqa: BLE001 - report and go on to the next configuration
        traceback.print_exc()
        r.note = f"error: {type(exc).__name__}: {str(exc)[:160]}"
    print(f"  {name:<52} {r.tok_s:>9.0f} tok/s  peak {r.peak_gib:6.1f} GiB  loss {r.loss:.4f} {r.note}", flush=True)
    return r


def lora_ddp(arch: dict, env: distributed.DistEnv, seq: int, steps: int, warmup: int, fast: FastOptions) -> dict:
    """Plain step, DDP step, plain step again on one model (DDP adds hooks only; plain calls leave them idle)."""
    device = env.device
    model = build_random_qwen2(arch, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    args = SftArgs(lora=LoraArgs(lora_rank=16, lora_alpha=32, lora_dropout=0.0), train=TrainArgs(), fast=fast)
    model, _ = attach_tuner(model, args.lora)
    if device.type == "cuda":
        prepare_for_training(model, fast)
    model.train()
    samples = rows(64, seq, arch["vocab_size"])
    plain = distributed.Parallel(env=replace(env, active=False))  # same rank/device, no collectives
    results = [time_steps("LoRA r16 plain (no wrapper)", session(model, args, samples, device, plain), steps, warmup, seq)]
    par = distributed.wrap(model, replace(env, strategy=distributed.Strategy("ddp", asked="bench")))
    results.append(time_steps("LoRA r16 DDP (torchrun, comm hook, all-reduces)", session(model, args, samples, device, par),
                              steps, warmup, seq))
    results.append(time_steps("LoRA r16 plain again", session(model, args, samples, device, plain), steps, warmup, seq))
    best_plain = max(results[0].tok_s, results[2].tok_s)
    ratio = results[1].tok_s / best_plain if best_plain else 0.0
    print(f"  DDP / plain tok/s: {ratio:.3f} (target >= 0.95)", flush=True)
    del model, par
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"lora": [vars(r) for r in results], "ddp_over_plain": ratio}


def full_fsdp(arch: dict, env: distributed.DistEnv, seq: int, steps: int, warmup: int, fast: FastOptions,
              offload: bool) -> dict:
    """Full fine-tuning: plain, then FSDP2 fully_shard (optionally CPU offload) on a fresh model each."""
    device = env.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = SftArgs(lora=LoraArgs(train_type="full"), train=TrainArgs(), fast=fast)
    samples = rows(64, seq, arch["vocab_size"])
    out = {}
    configs = [("full plain", None), ("full FSDP2 fully_shard", distributed.Strategy("fsdp", asked="bench"))]
    if offload:
        configs.append(("full FSDP2 fully_shard + CPU offload", distributed.Strategy("fsdp", offload=True, asked="bench")))
    todo = list(configs)
    while todo:
        name, strategy, compiled = *todo.pop(0), fast.torch_compile
        compiled = compiled and "no compile" not in name
        model = build_random_qwen2(arch, dtype, device)  # (sft loads FSDP2 runs on the CPU; same shards after)
        model, _ = attach_tuner(model, args.lora)
        model.config.use_cache = False
        if device.type == "cuda":
            prepare_for_training(model, replace(fast, fused_lora=False, torch_compile=compiled))
        model.train()
        if strategy is None:
            par = distributed.Parallel(env=replace(env, active=False))
        else:
            par = distributed.wrap(model, replace(env, strategy=strategy))
        s = session(model, args, samples, device, par)
        r = time_steps(name, s, steps, warmup, seq)
        out[name] = vars(r)
        if r.note and compiled:  # say whether compiled layers are what fails, by running once more without
            todo.insert(0, (name + " (no compile)", strategy))
        if strategy is not None and not r.note:
            t0 = time.perf_counter()
            state = distributed.gather_model_state(par, model)
            optim = distributed.gather_optimizer_state(par, model, s.optimizer)
            n = sum(v.numel() for v in state.values())
            out[name]["gather_s"] = time.perf_counter() - t0
            print(f"    checkpoint gather: {n / 1e9:.2f} B weights + optimizer state ({len(optim['state'])} "
                  f"tensors) on rank 0's CPU in {out[name]['gather_s']:.1f} s", flush=True)
            del state, optim
        del model, s, par
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, gloo: checks this script's logic")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation)")
    p.add_argument("--full-steps", type=int, default=5, help="timed steps of each full fine-tuning config")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-full", action="store_true", help="only the LoRA DDP measurement")
    p.add_argument("--skip-lora", action="store_true", help="only the full fine-tuning measurement")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not distributed.under_launcher():
        sys.exit("run me under torchrun: torchrun --standalone --nproc_per_node 1 bench/dist_gpu.py [--smoke]")
    fast = FastOptions(torch_compile=not a.no_compile)
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    seq, steps, warmup = (64, 2, 1) if a.smoke else (a.seq, a.steps, a.warmup)
    env = distributed.init(distributed.Strategy("ddp", asked="bench"), device, timeout_s=600)
    lora_arch = dict(TINY, vocab_size=1000) if a.smoke else QWEN25_7B
    full_arch = dict(TINY, vocab_size=1000) if a.smoke else QWEN25_1_5B
    print(f"world {env.world_size}, backend {torch.distributed.get_backend()}, device {env.device}, seq {seq}", flush=True)
    results = {"device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
               "world_size": env.world_size, "seq": seq}
    if not a.skip_lora:
        results.update(lora_ddp(lora_arch, env, seq, steps, warmup, fast))
    if not a.skip_full:
        full_steps, full_warmup = (steps, warmup) if a.smoke else (a.full_steps, 2)
        results["full"] = full_fsdp(full_arch, env, seq, full_steps, full_warmup, fast, offload=True)
    if a.json and env.is_main:
        a.json.write_text(json.dumps(results, indent=2))
    distributed.shutdown(env)


if __name__ == "__main__":
    main()
