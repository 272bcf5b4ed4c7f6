"""Training speed and memory: lorakit's fast step vs the HF+PEFT step, same weights, same data.

Qwen2.5-7B architecture with random bf16 weights built directly on the GPU, LoRA on all linear
layers, AdamW + grad clipping, random tokens. Prints one table (config, tok/s, peak GiB, MFU,
ratio to the reference) and the loss agreement. Usage (one GPU):

    PYTHONUNBUFFERED=1 python bench/train_speed.py [--steps 6] [--json out.json]

Reference: `model(**batch).loss` (transformers SDPA + PEFT, HF gradient checkpointing where the
config says). Fast: `prepare_for_training(model, FastOptions(...))` + `causal_lm_loss(fused=True)`
(the exact calls `lorakit sft` makes). MFU counts model FLOPs (4 x linear params per token, LoRA
has no frozen-weight gradients, plus causal attention) against the H100's 989 TFLOP/s dense bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.fast import FastOptions, decoder_layers, prepare_for_training, restore_reference  # noqa: E402
from lorakit.loss import causal_lm_loss  # noqa: E402
from qwen_arch import QWEN25_7B, TINY as TINY_ARCH  # noqa: E402

PEAK_FLOPS = 989e12
GIB = 1024**3
TINY = dict(TINY_ARCH, vocab_size=1000)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a --tiny dry run of this script's logic


@dataclass
class Result:
    config: str
    path: str  # "hf+peft" | "lorakit"
    tokens_per_step: int
    tok_s: float = 0.0
    peak_gib: float = 0.0
    mfu: float = 0.0
    first_loss: float = float("nan")
    note: str = ""
    step_times: list = field(default_factory=list)


# ---------------------------------------------------------------- data


def fixed_batch(bs: int, seq: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bs, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).expand(bs, seq).clone()}


def packed_batch(bs: int, seq: int, vocab: int, seed: int, lo: int = 50, hi: int = 1500) -> tuple[dict, int]:
    """Rows of `seq` tokens filled best-fit-decreasing with samples of lo-hi tokens; pads -100."""
    rng = random.Random(seed)
    lengths = sorted((rng.randint(lo, hi) for _ in range(2 * bs * seq // (lo + hi))), reverse=True)
    rows: list[list[int]] = [[] for _ in range(bs)]
    for n in lengths:
        fits = [r for r in rows if seq - sum(r) >= n]
        if fits:
            min(fits, key=lambda r: seq - sum(r)).append(n)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (bs, seq), generator=g)
    labels = torch.full((bs, seq), -100)
    pos = torch.zeros(bs, seq, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for n in row:
            labels[i, start : start + n] = ids[i, start : start + n]
            pos[i, start : start + n] = torch.arange(n)
            start += n
    real = int((labels != -100).sum())
    return {"input_ids": ids, "labels": labels, "position_ids": pos}, real


def attention_flops(position_ids: torch.Tensor, d: int, layers: int) -> float:
    """Causal attention FLOPs (fwd + bwd = 3 x fwd) summed over the packed samples."""
    starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(1).tolist() + [position_ids.numel()]
    pairs = sum((b - a) * (b - a + 1) / 2 for a, b in zip(starts, starts[1:]))
    return 3 * 4 * d * pairs * layers


def model_flops(cfg, batch: dict) -> float:
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * i) + cfg.vocab_size * h
    return 4 * linear * batch["input_ids"].numel() + attention_flops(batch["position_ids"], h, L)


# ---------------------------------------------------------------- model


def build_base(dims: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    print(f"model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{memory_allocated() / GIB:.1f} GiB", flush=True)
    model.requires_grad_(False)
    return model


def attach_lora(base, rank: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter path shows up in the loss comparison
            p.data.normal_(0, 0.02, generator=g)
    return model.train()


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_lora_state(model, state: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


# ---------------------------------------------------------------- steps


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def memory_allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


def run_steps(model, batch: dict, step_fn, steps: int, warmup: int, fused_adam: bool) -> tuple[list, float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused_adam)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    times, first_loss = [], float("nan")
    synchronize()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn(model, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            first_loss = float(loss)
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else 0.0
    del opt
    return times, peak, first_loss


def hf_step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def lorakit_step(model, batch):
    out = causal_lm_loss(model, batch, fused=True)
    loss = out.loss_sum / out.n_tokens
    loss.backward()
    return loss.detach()


def measure(name, path, model, batch, real_tokens, flops, step_fn, steps, warmup, fused_adam) -> Result:
    r = Result(name, path, real_tokens)
    try:
        times, r.peak_gib, r.first_loss = run_steps(model, batch, step_fn, steps, warmup, fused_adam)
        med = sorted(times)[len(times) // 2]
        r.step_times = [round(t, 4) for t in times]
        r.tok_s = real_tokens / med
        r.mfu = flops / med / PEAK_FLOPS
    except torch.OutOfMemoryError as e:
        r.note = "out of memory: " + str(e).split("\n")[0][:80]
    except Exception as e:  # noqa: BLE001 - keep measuring the other configs; the traceback is printed
        traceback.print_exc()
        r.note = f"error: {type(e).__name__}: {str(e)[:120]}"
    finally:
        model.zero_grad(set_to_none=True)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return r


# ---------------------------------------------------------------- GPU checks of the fast kernels


def check_kernels() -> list[str]:
    """Fast pieces vs their references on the GPU in bf16 (fresh random inputs)."""
    import torch.nn.functional as F

    from lorakit.fast.attention import masked_attention, varlen_attention
    from lorakit.fast.lora import lora_linear
    from lorakit.loss import ce_chunk_grad, chunk_fn_for

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    out = []
    q = torch.randn(3000, 28, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(3000, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(3000, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 700, 701, 2100, 3000], device="cuda", dtype=torch.int32)
    dy = torch.randn(3000, 28, 128, device="cuda", dtype=torch.bfloat16)
    a = varlen_attention(q, k, v, cu, 3000, 128**-0.5)
    ga = torch.autograd.grad(a, (q, k, v), dy)
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_attention(qf, kf, vf, cu, 128**-0.5)
    gr = torch.autograd.grad(ref, (qf, kf, vf), dy.double())
    out.append(f"varlen attention vs masked fp64: out {rel(a, ref):.1e}, dq {rel(ga[0], gr[0]):.1e}, dk {rel(ga[1], gr[1]):.1e}")
    logits = torch.randn(1024, 152064, device="cuda", dtype=torch.bfloat16) * 3
    t = torch.randint(0, 152064, (1024,), device="cuda")
    t[::7] = -100
    l1, g1 = chunk_fn_for(logits.device)(logits, t)
    l2, g2 = ce_chunk_grad(logits.double(), t)
    out.append(f"compiled CE chunk vs fp64: loss {rel(l1, l2):.1e}, grad {rel(g1, g2):.1e}")
    x = torch.randn(4096, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(18944, 3584, device="cuda", dtype=torch.bfloat16) / 60
    la = torch.randn(16, 3584, device="cuda", requires_grad=True)
    lb = torch.randn(18944, 16, device="cuda", requires_grad=True)
    y = lora_linear(x, w, None, la, lb, 2.0)
    dy = torch.randn_like(y)
    gy = torch.autograd.grad(y, (x, la, lb), dy)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, la, lb))
    yr = F.linear(xd, w.double()) + 2.0 * (xd @ ad.t()) @ bd.t()
    gyr = torch.autograd.grad(yr, (xd, ad, bd), dy.double())
    out.append(
        f"fused LoRA vs fp64: y {rel(y, yr):.1e}, dx {rel(gy[0], gyr[0]):.1e}, dA {rel(gy[1], gyr[1]):.1e}, dB {rel(gy[2], gyr[2]):.1e}"
    )
    for line in out:
        print("check:", line, flush=True)
    return out


# ---------------------------------------------------------------- the table


def run_all(args) -> list[Result]:
    results: list[Result] = []
    s, w = args.steps, args.warmup
    parts = set(args.parts.split(","))  # t1fast alone: the step benchmark `bench/sft_gpu.py` compares with

    def add(r: Result, model=None) -> None:
        if model is not None:
            r.note += f" ckpt layers {sum(layer.gradient_checkpointing for layer in decoder_layers(model))}"
        results.append(r)
        print(json.dumps(asdict(r)), flush=True)

    def reference(name, model, batch, ckpt: bool) -> None:
        state = lora_state(model)
        restore_reference(model)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        real = int((batch["labels"] != -100).sum())
        add(measure(name, "hf+peft" + (" ckpt" if ckpt else ""), model, batch, real, model_flops(model.config, batch),
                    hf_step, max(2, s // 2), 1, False))
        model.gradient_checkpointing_disable()
        load_lora_state(model, state)

    def fast(name, model, batch, state, steps=s, warmup=w, opts=None) -> None:
        load_lora_state(model, state)
        real = int((batch["labels"] != -100).sum())
        r = measure(name, "lorakit", model, batch, real, model_flops(model.config, batch), lorakit_step, steps, warmup, True)
        if r.note.startswith("error") and fast_opts["compile"]:  # measure the eager fast path instead
            fast_opts["compile"] = False
            add(r)
            for layer in decoder_layers(model):
                layer._compiled_call_impl = None
            prepare_for_training(model, replace(opts or FastOptions(), torch_compile=False))
            load_lora_state(model, state)
            r = measure(name, "lorakit eager", model, batch, real, model_flops(model.config, batch), lorakit_step,
                        steps, warmup, True)
        add(r, model)

    # T1 + packing: r16, rows of 4096
    dims = TINY if args.tiny else QWEN25_7B
    fast_opts = dict(compile=not args.no_compile)
    model = attach_lora(build_base(dims), 16)
    vocab = model.config.vocab_size
    state = lora_state(model)
    div = 8 if args.tiny else 1  # sequence lengths shrink with the toy model
    t1 = fixed_batch(1, 4096 // div, vocab, 10)
    if "t1" in parts:
        reference("T1 r16 seq4096 bs1", model, t1, ckpt=True)
    prepare_for_training(model, FastOptions(torch_compile=fast_opts["compile"]))
    fast("T1 r16 seq4096 bs1", model, t1, state)
    if "t1" in parts:
        fast("T1 r16 seq4096 bs2", model, fixed_batch(2, 4096 // div, vocab, 10), state)
        fast("packed 50-1500 -> 4096 bs2", model, packed_batch(2, 4096 // div, vocab, 11, 50 // div, 1500 // div)[0],
             state)
    del model, state
    if "t2" not in parts:
        return results
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    # T2 + T3: r8
    model = attach_lora(build_base(dims), 8)
    state = lora_state(model)
    t2, t3 = fixed_batch(1, 2048 // div, vocab, 12), fixed_batch(1, 16384 // div, vocab, 13)
    reference("T2 r8 seq2048 bs1", model, t2, ckpt=True)
    if "t3" in parts:
        reference("T2 r8 seq2048 bs1", model, t2, ckpt=False)
    if "t3" in parts and not args.skip_t3_ref:
        reference("T3 r8 seq16384", model, t3, ckpt=True)
    opts = FastOptions(gpu_memory_limit=args.t2_limit, torch_compile=fast_opts["compile"])
    prepare_for_training(model, opts)
    fast("T2 r8 seq2048 bs1", model, t2, state, opts=opts)
    if "t3" not in parts:
        return results
    opts = replace(opts, gpu_memory_limit=args.t3_limit, torch_compile=fast_opts["compile"])
    prepare_for_training(model, opts)
    fast("T3 r8 seq16384", model, t3, state, max(2, s // 2), 2, opts=opts)
    return results


def print_table(results: list[Result]) -> None:
    ref = {}
    for r in results:
        if r.path.startswith("hf+peft") and r.tok_s:
            ref.setdefault(r.config, r)
    print("\n| config | path | tok/s | peak GiB | MFU | vs HF+PEFT | first loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        base = ref.get(r.config) or ref.get(r.config.replace(" bs2", " bs1"))
        ratio = f"{r.tok_s / base.tok_s:.2f}x" if base and r.tok_s and r is not base else ""
        loss_d = ""
        if base and r.path == "lorakit" and not math.isnan(r.first_loss) and r.config == base.config:
            loss_d = f" (ref {base.first_loss:.4f}, rel {abs(r.first_loss - base.first_loss) / base.first_loss:.1e})"
        tok = f"{r.tok_s:,.0f}" if r.tok_s else r.note
        print(f"| {r.config} | {r.path} | {tok} | {r.peak_gib:.1f} | {100 * r.mfu:.1f}% | {ratio} | {r.first_loss:.4f}{loss_d} |")
    fixed = [r for r in results if r.config == "T1 r16 seq4096 bs2" and r.path.startswith("lorakit") and r.tok_s]
    packed = [r for r in results if r.config.startswith("packed") and r.tok_s]
    if fixed and packed:
        print(f"\npacking keeps {100 * packed[-1].tok_s / fixed[-1].tok_s:.1f}% of fixed-length tok/s (real tokens)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per config (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--t2-limit", type=float, default=19.8, help="gpu_memory_limit for T2 (target: peak <= 20 GiB)")
    p.add_argument("--t3-limit", type=float, default=38.5, help="gpu_memory_limit for T3 (target: peak <= 40 GiB)")
    p.add_argument("--skip-t3-ref", action="store_true", help="skip the slow HF+PEFT 16k reference")
    p.add_argument("--json", type=Path, help="also write every result here")
    p.add_argument("--parts", default="t1,t2,t3", help="t1: T1 with its reference, bs2 and packed; t2: the 24-GB plan "
                   "(r8 seq 2048) and HF+PEFT ckpt; t3: HF+PEFT without ckpt and 16k. The T1 bs1 fast step always runs")
    p.add_argument("--no-compile", action="store_true", help="FastOptions(torch_compile=False)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model (checks this script on CPU)")
    args = p.parse_args()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(torch.__version__, name, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), flush=True)
    t0 = time.time()
    checks = check_kernels() if DEVICE == "cuda" else []
    results = run_all(args)
    print_table(results)
    print(f"\ntotal {time.time() - t0:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checks": checks, "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
