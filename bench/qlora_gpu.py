"""QLoRA speed and memory: lorakit vs HF+PEFT+bitsandbytes, same 4-bit weights, same batch, one process.

Qwen2.5-7B architecture with random bf16 weights saved as safetensors, loaded quantized (NF4 + double
quant, bf16 compute) by both sides; LoRA r16 (alpha 32, no dropout) on every linear layer; AdamW;
random tokens, every token a target. Figures (printed as each part finishes, so a failure in one
part keeps the others):

- memory after the quantized load (lorakit keeps embeddings and head in bf16; the reference's
  prepare_model_for_kbit_training up-casts them to fp32);
- seq 2048, batch 1: tok/s, peak allocated and layers recomputed of lorakit (fused LoRA over the
  de-quantized weight, and PEFT's bitsandbytes layer, both under lorakit's other fast paths and the
  same memory limit) and of HF+PEFT+bitsandbytes with gradient checkpointing; the ratios;
- seq 8192, batch 1: lorakit's peak and tok/s, both LoRA paths;
- loss at step 1 and after the first optimizer step, lorakit vs the reference.

Targets (issue 19): >= 1.5x the reference's tok/s at <= 8 GiB (seq 2048); <= 14 GiB at seq 8192.

    PYTHONUNBUFFERED=1 python bench/qlora_gpu.py --out /tmp/qlora [--steps 6]
    python bench/qlora_gpu.py --smoke          # CPU, tiny model: the script's own logic
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lorakit.args import LoraArgs, QuantArgs  # noqa: E402
from lorakit.fast import FastOptions, decoder_layers, describe_fast_paths, prepare_for_training  # noqa: E402
from lorakit.loss import causal_lm_loss  # noqa: E402
from lorakit.model import load_model  # noqa: E402
from lorakit.quantize import LOSS_CHUNK, prepare_kbit_training, training_line  # noqa: E402
from lorakit.tuners import attach_tuner  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402

GIB = 1024**3
RANK, ALPHA, LR = 16, 32, 1e-3
FIGURES: dict = {}


def report(key: str, value) -> None:
    """Print one figure at once (and keep it for the summary line); a figure already printed is not repeated."""
    if FIGURES.get(key) == value:
        return
    FIGURES[key] = value
    print(f"{key}: {value}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocated_gib(device) -> float:
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else 0.0


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else 0.0


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_folder(out: Path, settings: dict, device) -> Path:
    """The random model as a Hugging Face folder (bf16 on GPU, fp32 on CPU), written once."""
    folder = out / ("qwen2.5-7b-random" if settings is QWEN25_7B else "tiny-random")
    if (folder / "config.json").is_file():
        return folder
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model = build_random_qwen2(settings, dtype, device)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    free(device)
    print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def make_batch(seq: int, vocab: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


def quant_args() -> QuantArgs:
    return QuantArgs(quant_method="bnb", quant_bits=4, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_compute_dtype="bfloat16")


def run_steps(model, batch, loss_fn, optimizer, steps: int, warmup: int, device) -> tuple[list[float], float]:
    """(losses of every step, tok/s over the steps after `warmup`)."""
    losses, started = [], None
    tokens = batch["input_ids"].numel()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            started = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync(device)
    return losses, steps * tokens / (time.perf_counter() - started)


def lorakit_loss(model, batch):
    out = causal_lm_loss(model, batch, fused=True, chunk_size=LOSS_CHUNK)  # as sft on a quantized base
    return out.loss_sum / out.n_tokens


def hf_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def optimizer_for(model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda" or None)


def lora_args() -> LoraArgs:
    return LoraArgs(lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["all-linear"])


def adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reset_adapter(model, state: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


@dataclass
class Lorakit:
    """lorakit's QLoRA model, kept loaded between the runs (the adapter is reset before each)."""

    model: torch.nn.Module
    initial: dict


def lorakit_setup(folder: Path, device) -> Lorakit:
    """lorakit's quantized load (as sft does it) and LoRA r16 on every linear layer."""
    reset_peak(device)
    started = time.perf_counter()
    model = load_model(folder, torch_dtype="bfloat16" if device.type == "cuda" else "float32", device=device,
                       quant=quant_args())
    report("lorakit_load_s", round(time.perf_counter() - started, 1))
    report("lorakit_after_load_gib", round(allocated_gib(device), 2))
    model = prepare_kbit_training(model)
    torch.manual_seed(0)
    model, summary = attach_tuner(model, lora_args())
    print(summary.line(), flush=True)
    return Lorakit(model, adapter_state(model))


def lorakit_run(lk: Lorakit, name: str, seq: int, device, *, fused: bool = True, limit: float | None = None,
                steps: int = 6, warmup: int = 3, seed: int = 0) -> None:
    """Steps of lorakit's training step (fast paths as sft sets them on a GPU) on one batch of `seq` tokens."""
    on_gpu = device.type == "cuda"
    fast = FastOptions(fused_lora=fused, gpu_memory_limit=limit) if on_gpu else FastOptions.reference()
    prepare_for_training(lk.model, fast)
    # from_pretrained returns eval mode: without train() neither the recompute plan (it plans in training
    # only) nor transformers' per-layer checkpointing runs (the 2026-12-03 run: 27 GiB at seq 2048)
    lk.model.train()
    print(describe_fast_paths(lk.model, fast if on_gpu else None, device), flush=True)
    print(training_line(lk.model, quant_args(), device, fused_lora=fused), flush=True)
    reset_adapter(lk.model, lk.initial)
    batch = make_batch(seq, lk.model.config.vocab_size, device, seed=seed)
    free(device)
    reset_peak(device)
    losses, tok_s = run_steps(lk.model, batch, lorakit_loss, optimizer_for(lk.model, device), steps, warmup, device)
    layers = decoder_layers(lk.model)
    recomputed = sum(bool(layer.gradient_checkpointing) for layer in layers)
    report(f"lorakit_{name}_seq{seq}", {"tok_s": round(tok_s, 1), "peak_gib": round(peak_gib(device), 2),
                                        "limit_gib": limit, "recomputed_layers": f"{recomputed}/{len(layers)}",
                                        "loss_step1": losses[0], "loss_step2": losses[1]})


def reference_part(folder: Path, device, dtype, opts) -> None:
    """HF+PEFT+bitsandbytes as its docs teach: prepare_model_for_kbit_training, HF gradient checkpointing.

    lorakit's model stays loaded meanwhile: the reference's figures are counted above what was allocated
    before its load.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    free(device)
    held = allocated_gib(device)
    started = time.perf_counter()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=config,
                                                 device_map={"": str(device)}, attn_implementation="sdpa")
    report("reference_load_s", round(time.perf_counter() - started, 1))
    report("reference_after_load_gib", round(allocated_gib(device) - held, 2))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    report("reference_after_prepare_gib", round(allocated_gib(device) - held, 2))
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    batch = make_batch(opts.seq, model.config.vocab_size, device)
    free(device)
    reset_peak(device)
    losses, tok_s = run_steps(model, batch, hf_loss, optimizer_for(model, device), opts.steps, opts.warmup, device)
    report(f"reference_seq{opts.seq}", {"tok_s": round(tok_s, 1), "peak_gib": round(peak_gib(device) - held, 2),
                                        "loss_step1": losses[0], "loss_step2": losses[1]})
    del model
    free(device)


def attempt(name: str, device, fn):
    """Run one part; a failure prints its traceback and the others still run."""
    try:
        return fn()
    except Exception:
        print(f"{name} failed:\n{traceback.format_exc()}", flush=True)
        free(device)
        return None


def compare() -> None:
    """The ratios and loss agreement, from whatever parts finished."""
    fused, ref = FIGURES.get(f"lorakit_fused_seq{ARGS.seq}"), FIGURES.get(f"reference_seq{ARGS.seq}")
    if fused and ref:
        report("speedup_vs_reference", round(fused["tok_s"] / ref["tok_s"], 2))
        for step in ("loss_step1", "loss_step2"):
            report(f"{step}_abs_diff", abs(fused[step] - ref[step]))
    for seq in (ARGS.seq, ARGS.long_seq):
        fused, unfused = FIGURES.get(f"lorakit_fused_seq{seq}"), FIGURES.get(f"lorakit_peft_bnb_layer_seq{seq}")
        if fused and unfused:  # the same memory limit: compare only when the plans recompute alike
            same = fused["recomputed_layers"] == unfused["recomputed_layers"]
            report(f"fused_over_peft_bnb_layer_seq{seq}", {"tok_s_ratio": round(fused["tok_s"] / unfused["tok_s"], 3),
                                                           "same_recompute_plan": same})


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/qlora-bench")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: the script's logic only")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (the first compiles)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--long_seq", type=int, default=8192, help="0: skip")
    parser.add_argument("--limit_2048", type=float, default=7.5, help="GiB lorakit's recompute plan keeps under")
    parser.add_argument("--limit_long", type=float, default=13.5)
    parser.add_argument("--skip_unfused", action="store_true", help="skip lorakit with PEFT's bnb layer")
    ARGS = opts = parser.parse_args()
    device = torch.device("cpu" if opts.smoke or not torch.cuda.is_available() else "cuda")
    if opts.smoke:
        opts.seq, opts.long_seq, opts.steps, opts.warmup = 64, 128, 2, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import bitsandbytes
    import transformers

    report("setup", {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__})
    folder = build_folder(Path(opts.out), TINY if opts.smoke else QWEN25_7B, device)
    # Most wanted first: a run cut by a time limit still printed the figures before it.
    lk = attempt("lorakit setup", device, lambda: lorakit_setup(folder, device))
    unfused = not opts.skip_unfused
    runs = [
        ("lorakit seq 2048 fused", lambda: lorakit_run(lk, "fused", opts.seq, device, limit=opts.limit_2048,
                                                       steps=opts.steps, warmup=opts.warmup)),
        ("lorakit seq 2048 PEFT layer", lambda: unfused and lorakit_run(
            lk, "peft_bnb_layer", opts.seq, device, fused=False, limit=opts.limit_2048, steps=opts.steps,
            warmup=opts.warmup)),
        ("reference", lambda: reference_part(folder, device, dtype, opts)),
        ("lorakit long", lambda: opts.long_seq and lorakit_run(
            lk, "fused", opts.long_seq, device, limit=opts.limit_long, steps=max(2, opts.steps // 2), warmup=1, seed=1)),
        ("lorakit long PEFT layer", lambda: opts.long_seq and unfused and lorakit_run(
            lk, "peft_bnb_layer", opts.long_seq, device, fused=False, limit=opts.limit_long,
            steps=max(2, opts.steps // 2), warmup=1, seed=1)),
    ]
    for name, run in runs:
        if lk is not None or name == "reference":
            attempt(name, device, run)
        compare()
    print("summary " + json.dumps(FIGURES), flush=True)


ARGS = None

if __name__ == "__main__":
    main()
