"""DPO training speed and memory: lorakit's preference step vs TRL's DPOTrainer + PEFT, same run.

Qwen2.5-7B architecture with random bf16 weights built on the GPU, LoRA r16 (alpha 32, dropout 0)
on all linear layers, pairs of 512 prompt + 512 chosen + 512 rejected random tokens, one pair per
step, AdamW. tok/s counts the tokens of both sequences (2 x 1024 per pair), as the issue's TRL
figure does (6,190 tok/s at 28.9 GiB without gradient checkpointing on the H200, 2026-12-02).

lorakit: the calls `lorakit rlhf` makes: attach_tuner -> prepare_for_training (fused LoRA, packed
attention, compiled layers, recompute planned under --gpu_memory_limit) -> the reference log-probs
precomputed in one no-grad pass -> pair_loss (chosen and rejected rows in one forward, chunked head
over the answer tokens). Three lorakit configs: one pair per step; the prompt run once for both
answers (shared prefix); two pairs per step. TRL: DPOTrainer(peft_config=LoraConfig) with its
defaults (reference = adapter disabled, computed every step), gradient checkpointing off.

Each row prints steady-state tok/s (after warm-up), peak allocated GiB, and the "epoch" tok/s that
also charges lorakit's reference pass (one epoch over the pairs: ref pass + steps).

    PYTHONUNBUFFERED=1 python bench/dpo_gpu.py [--steps 12 --warmup 4] [--json out.json]
    python bench/dpo_gpu.py --smoke          # CPU, tiny model, a dry run of this script's logic
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lorakit.args import LoraArgs, RlhfGroup  # noqa: E402
from lorakit.data.render import Rendered  # noqa: E402
from lorakit.rlhf.data import RenderedPair, collate_pairs  # noqa: E402
from lorakit.rlhf.objective import make_preference_loss_fn  # noqa: E402
from lorakit.rlhf.reference import sequence_logps  # noqa: E402
from lorakit.tuners import attach_tuner, trainable_parameters  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402

GIB = 1024**3
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
TRL_REFERENCE = {"tok_s": 6190, "peak_gib": 28.9}  # the measurement, H200, TRL 1.16, no checkpointing


@dataclass
class Result:
    name: str
    tok_s: float
    peak_gib: float
    epoch_tok_s: float | None = None
    ref_pass_s: float | None = None
    error: str | None = None


def random_pairs(n: int, prompt: int, answer: int, vocab: int, seed: int = 0) -> list[RenderedPair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p, c, r = (torch.randint(100, vocab - 100, (k,), generator=g).tolist() for k in (prompt, answer, answer))
        side = lambda a: Rendered(input_ids=p + a, labels=[-100] * len(p) + a)  # noqa: E731
        pairs.append(RenderedPair(side(c), side(r), "bench"))
    return pairs


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else 0.0


def reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_lorakit(name: str, arch: dict, pairs: list, *, per_step: int, shared: bool, steps: int, warmup: int,
                device: str, memory_limit: float | None) -> Result:
    """lorakit's preference step: the reference pass, then `steps` timed optimizer steps after `warmup`."""
    from lorakit.fast import FastOptions, prepare_for_training

    reset_memory(device)
    base = build_random_qwen2(arch, torch.bfloat16 if device == "cuda" else torch.float32, device, weight_std=0.02)
    model, _ = attach_tuner(base, LoraArgs(lora_rank=16, lora_alpha=32, lora_dropout=0.0))
    if device == "cuda":
        model = prepare_for_training(model, FastOptions(gpu_memory_limit=memory_limit))
    collate = lambda chunk: {k: v.to(device) for k, v in collate_pairs(chunk, 0, shared_prefix=shared).items()}  # noqa: E731
    needed = pairs[:(steps + warmup) * per_step]
    synchronize(device)
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        for i in range(0, len(needed), per_step):
            chunk = needed[i:i + per_step]
            logps = sequence_logps(model, collate(chunk)).tolist()
            for pair, c, r in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                pair.ref_chosen, pair.ref_rejected = c, r
    synchronize(device)
    ref_pass_s = time.perf_counter() - t0
    model.train()
    loss_fn = make_preference_loss_fn(RlhfGroup(rlhf_type="dpo"))
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda" or None)
    times = []
    for step in range(steps + warmup):
        if step == warmup:
            reset_memory(device) if device != "cuda" else torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        t = time.perf_counter()
        out = loss_fn(model, collate(needed[step * per_step:(step + 1) * per_step]))
        (out.loss_sum / out.n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t)
    tokens_per_step = per_step * sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in needed[:1])
    steady = tokens_per_step * steps / sum(times[warmup:])
    per_pair_ref = ref_pass_s / len(needed)
    epoch = tokens_per_step / (sum(times[warmup:]) / steps + per_pair_ref * per_step)
    result = Result(name, round(steady, 1), round(peak_gib(device), 2), round(epoch, 1), round(ref_pass_s, 2))
    del model, base, optimizer
    return result


class _Timer:
    """A TrainerCallback recording the wall time of each optimizer step (after a device sync)."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                synchronize(device)
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                synchronize(device)
                timer.times.append(time.perf_counter() - timer.start)
                if len(timer.times) == timer.warmup and device == "cuda":
                    torch.cuda.reset_peak_memory_stats()

        self.callback, self.times, self.start, self.warmup = Callback(), [], 0.0, 0


def run_trl(arch: dict, pairs: list, *, steps: int, warmup: int, device: str, out_dir: Path) -> Result:
    """TRL's DPOTrainer with a PEFT LoRA, the same pairs pre-tokenized (its tokenizing map skipped)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    reset_memory(device)
    model = build_random_qwen2(arch, torch.bfloat16 if device == "cuda" else torch.float32, device, weight_std=0.02)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    n = steps + warmup
    rows = [{"prompt_ids": p.chosen.input_ids[:-len([t for t in p.chosen.labels if t != -100])],
             "chosen_ids": [t for t in p.chosen.labels if t != -100],
             "rejected_ids": [t for t in p.rejected.labels if t != -100]} for p in pairs[:n]]
    config = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=1, max_steps=n, learning_rate=1e-5,
                       gradient_checkpointing=False, bf16=device == "cuda", use_cpu=device != "cuda",
                       max_length=None, logging_steps=10**6, save_strategy="no", report_to=[],
                       dataloader_num_workers=0, seed=0)
    timer = _Timer(device)
    timer.warmup = warmup
    trainer = PreTokenized(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"),
                           callbacks=[timer.callback])
    trainer.train()
    tokens_per_step = len(pairs[0].chosen.input_ids) + len(pairs[0].rejected.input_ids)
    steady = tokens_per_step * steps / sum(timer.times[warmup:])
    result = Result("TRL DPOTrainer + PEFT (no checkpointing)", round(steady, 1), round(peak_gib(device), 2))
    del trainer, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--memory_limit", type=float, default=28.0, help="lorakit's --gpu_memory_limit, GiB")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short pairs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--out", default="/tmp/dpo-gpu")
    opts = parser.parse_args()
    device = "cpu" if opts.smoke else "cuda"
    arch, prompt, answer = (dict(TINY, vocab_size=151936), 32, 32) if opts.smoke else (QWEN25_7B, 512, 512)
    if opts.smoke:
        opts.steps, opts.warmup = 2, 1
    n = (opts.steps + opts.warmup) * 2
    results = []
    configs = [("lorakit, 1 pair per step", 1, False), ("lorakit, 1 pair per step, prompt run once", 1, True),
               ("lorakit, 2 pairs per step", 2, False)]
    for name, per_step, shared in configs:
        try:
            results.append(run_lorakit(name, arch, random_pairs(n, prompt, answer, arch["vocab_size"]),
                                       per_step=per_step, shared=shared, steps=opts.steps, warmup=opts.warmup,
                                       device=device, memory_limit=opts.memory_limit))
        except Exception as exc:  # one config failing must not hide the others' figures
            traceback.print_exc()
            results.append(Result(name, 0.0, 0.0, error=f"{type(exc).__name__}: {exc}"[:300]))
        print(json.dumps(asdict(results[-1])), flush=True)
    try:
        results.append(run_trl(arch, random_pairs(n, prompt, answer, arch["vocab_size"]), steps=opts.steps,
                               warmup=opts.warmup, device=device, out_dir=Path(opts.out)))
    except Exception as exc:
        traceback.print_exc()
        results.append(Result("TRL DPOTrainer + PEFT (no checkpointing)", 0.0, 0.0, error=f"{type(exc).__name__}: {exc}"[:300]))
    print(json.dumps(asdict(results[-1])), flush=True)
    trl = results[-1].tok_s or None
    print(f"\n{'config':<46} {'tok/s':>9} {'epoch tok/s':>12} {'peak GiB':>9} {'vs TRL (same run)':>18}")
    for r in results:
        ratio = f"{r.tok_s / trl:.2f}x" if trl and r.tok_s else "-"
        epoch = f"{r.epoch_tok_s:,.0f}" if r.epoch_tok_s else "-"
        print(f"{r.name:<46} {r.tok_s:>9,.0f} {epoch:>12} {r.peak_gib:>9.2f} {ratio:>18}" + (f"  {r.error}" if r.error else ""))
    if not opts.smoke:
        print(f"target: >= 2x TRL ({2 * TRL_REFERENCE['tok_s']:,} tok/s on the issue's figure) at <= "
              f"{TRL_REFERENCE['peak_gib']} GiB")
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
