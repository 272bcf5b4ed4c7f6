"""DPO training speed and memory: lorakit's preference step vs TRL's DPOTrainer + PEFT, in one call.

Qwen2.5-7B architecture with random bf16 weights built on the GPU, LoRA r16 (alpha 32, dropout 0)
on all linear layers, pairs of 512 prompt + 512 chosen + 512 rejected random tokens, one pair per
step, AdamW. tok/s counts the tokens of both sequences (2 x 1024 per pair), as the issue's TRL
figure does (6,190 tok/s at 28.9 GiB without gradient checkpointing on the H200, 2026-12-02).

Each side runs in a child process with its own time limit, so a crash, an OOM or a hang on one side
still leaves the other side's figures and the comparison printed (and each side's peak memory is its
own). The comparison is printed at the end in any case.

lorakit: what `lorakit rlhf --rlhf_type dpo` runs on a GPU: attach_tuner -> prepare_for_training (fused
LoRA, packed attention, compiled layers, recompute planned under --gpu_memory_limit) -> the command's
own reference pass (command.fill_reference: REFERENCE_BATCH pairs per no-grad forward) -> pair_loss
steps with the replay anchor, on by default for dpo (one anchor answer per ANCHOR_EVERY_PAIRS pairs, joined to
the pair's rows in one forward; stand-in answers of the built-in sizes, whose one-off generation is not timed);
a second lorakit side runs `--replay_kl 0`. Its costs are split the way a user pays them:
- tok_s: steady training steps (after warm-up);
- ref_pair_s: the reference pass per pair once warm (a recurring cost: one no-grad forward per pair);
- epoch_tok_s: tokens per (step + reference per pair), i.e. an epoch's steady rate with the reference
  pass charged;
- one_off_s: compilation and first-call work (the reference pass's first batch and the first training
  steps, beyond their steady cost), paid once per run whatever the data size;
- ref_eager_pair_s: the reference pass per pair with the compiled layers bypassed (force_eager): with
  ref_pair_s and the first batch's share of one_off_s, the data size above which compiling the no-grad
  graph pays for itself.
(The earlier script divided the whole reference pass, compilation included, by 16 pairs: 30 s -> 1.9 s a
pair, an "epoch" figure of 701 tok/s that no real run of more than a handful of pairs sees.)
TRL: DPOTrainer(peft_config=LoraConfig) with its defaults (reference = adapter disabled, computed every
step), gradient checkpointing off.

    PYTHONUNBUFFERED=1 python bench/dpo_gpu.py [--steps 10 --warmup 3] [--json out.json]
    python bench/dpo_gpu.py --smoke          # CPU, tiny model, a dry run of this script's logic
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lorakit.args import LoraArgs, RlhfGroup  # noqa: E402
from lorakit.data.render import Rendered  # noqa: E402
from lorakit.rlhf.command import REFERENCE_BATCH, fill_reference  # noqa: E402
from lorakit.rlhf.anchor import (  # noqa: E402
    ANCHOR_EVERY_PAIRS, ANCHOR_MAX_NEW_TOKENS, anchor_samples, load_anchor_prompts)
from lorakit.rlhf.data import PreferenceData, RenderedPair, attach_anchors, collate_pairs  # noqa: E402
from lorakit.rlhf.objective import make_preference_loss_fn  # noqa: E402
from lorakit.replay import REPLAY_TOP_K, ReplayAnswer  # noqa: E402
from lorakit.tuners import attach_tuner, trainable_parameters  # noqa: E402
from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402

GIB = 1024**3
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
TRL_REFERENCE = {"tok_s": 6190, "peak_gib": 28.9}  # the measurement, H200, TRL 1.16, no checkpointing
TRL_NAME = "TRL DPOTrainer + PEFT (no checkpointing)"
LORAKIT_NAME = "lorakit rlhf --rlhf_type dpo (defaults, 1 pair/step)"
NAMES = {"lorakit": LORAKIT_NAME, "lorakit_no_anchor": "lorakit, --replay_kl 0 (no anchor)", "trl": TRL_NAME}
ANCHOR_PROMPT_TOKENS = 40  # about a built-in anchor prompt in the chat template
MARK = "RESULT "


@dataclass
class Result:
    name: str
    tok_s: float = 0.0
    peak_gib: float = 0.0
    epoch_tok_s: float | None = None
    ref_pair_s: float | None = None
    ref_eager_pair_s: float | None = None
    one_off_s: float | None = None
    seconds: float | None = None
    error: str | None = None


def random_pairs(n: int, prompt: int, answer: int, vocab: int, seed: int = 0) -> list[RenderedPair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p, c, r = (torch.randint(100, vocab - 100, (k,), generator=g).tolist() for k in (prompt, answer, answer))
        side = lambda a: Rendered(input_ids=p + a, labels=[-100] * len(p) + a)  # noqa: E731
        pairs.append(RenderedPair(side(c), side(r), "bench"))
    return pairs


def random_anchor_answers(n: int, vocab: int, seed: int = 1) -> list[ReplayAnswer]:
    """Stand-ins for the starting policy's answers to the anchor prompts (`--replay_kl`, on by default for dpo):
    random prompt and answer ids of the built-in sizes, a top-k distribution at every answer position. Their
    one-off generation (48 prompts x ANCHOR_MAX_NEW_TOKENS greedy tokens) is not timed."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(100, vocab - 100, (k,), generator=g).tolist()  # noqa: E731
    probs = torch.rand(REPLAY_TOP_K, generator=g)
    probs = (probs / probs.sum() * 0.9).tolist()  # the top-k hold 0.9, the rest of the vocabulary 0.1
    return [ReplayAnswer(prompt="bench", prompt_ids=rand(ANCHOR_PROMPT_TOKENS), answer_ids=rand(ANCHOR_MAX_NEW_TOKENS),
                         top_ids=[rand(REPLAY_TOP_K) for _ in range(ANCHOR_MAX_NEW_TOKENS)],
                         top_probs=[probs] * ANCHOR_MAX_NEW_TOKENS) for _ in range(n)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else 0.0


def timed(device: str, fn) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def run_lorakit(arch: dict, pairs: list[RenderedPair], *, steps: int, warmup: int, device: str,
                memory_limit: float | None, anchor: bool = True) -> Result:
    """The command's GPU path: reference pass (first batch warm-up, the rest steady), then the steps."""
    from lorakit.fast import FastOptions, prepare_for_training

    base = build_random_qwen2(arch, torch.bfloat16 if device == "cuda" else torch.float32, device, weight_std=0.02)
    model, _ = attach_tuner(base, LoraArgs(lora_rank=16, lora_alpha=32, lora_dropout=0.0))
    if device == "cuda":
        model = prepare_for_training(model, FastOptions(gpu_memory_limit=memory_limit))
    dev = torch.device(device)
    # a pair's prompt runs once for both sides, as the command does (rlhf.command.shares_prompt_run)
    ref = lambda chunk: fill_reference(model, PreferenceData(chunk, [], []), pad_id=0, device=dev,  # noqa: E731
                                       batch_size=REFERENCE_BATCH, fused=True, shared=True)
    ref_first = timed(device, lambda: ref(pairs[:REFERENCE_BATCH]))
    rest = pairs[REFERENCE_BATCH:]
    ref_pair_s = timed(device, lambda: ref(rest)) / len(rest)
    with torch.compiler.set_stance("force_eager"):  # would skipping the no-grad compile pay for itself?
        ref_eager_pair_s = timed(device, lambda: ref(rest)) / len(rest)
    model.train()
    if anchor:  # as the command does: one anchor answer per ANCHOR_EVERY_PAIRS pairs, after the reference pass
        answers = random_anchor_answers(len(load_anchor_prompts()), arch["vocab_size"])
        attach_anchors(pairs, anchor_samples(answers), every=ANCHOR_EVERY_PAIRS)
    group = RlhfGroup(rlhf_type="dpo") if anchor else RlhfGroup(rlhf_type="dpo", replay_kl=0.0)
    loss_fn = make_preference_loss_fn(group)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda" or None)

    def step(i: int) -> None:
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[i:i + 1], 0, shared_prefix=True).items()}
        out = loss_fn(model, batch)
        (out.loss_sum / out.n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm = [timed(device, lambda: step(i)) for i in range(warmup)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(device, lambda: step(warmup + i)) for i in range(steps)]
    print(json.dumps({"side": "lorakit" if anchor else "lorakit_no_anchor", "warmup_s": [round(t, 3) for t in warm],
                      "step_s": [round(t, 4) for t in times]}), file=sys.stderr, flush=True)
    step_s = sum(times) / steps
    tokens = len(pairs[0].chosen.input_ids) + len(pairs[0].rejected.input_ids)
    one_off = (ref_first - ref_pair_s * REFERENCE_BATCH) + (sum(warm) - step_s * warmup)
    name = NAMES["lorakit" if anchor else "lorakit_no_anchor"]
    return Result(name, round(tokens / step_s, 1), round(peak_gib(device), 2),
                  epoch_tok_s=round(tokens / (step_s + ref_pair_s), 1), ref_pair_s=round(ref_pair_s, 4),
                  ref_eager_pair_s=round(ref_eager_pair_s, 4), one_off_s=round(one_off, 1))


class _Timer:
    """A TrainerCallback recording the wall time of each optimizer step (after a device sync)."""

    def __init__(self, device: str, warmup: int):
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

        self.callback, self.times, self.start, self.warmup = Callback(), [], 0.0, warmup


def run_trl(arch: dict, pairs: list[RenderedPair], *, steps: int, warmup: int, device: str, out_dir: Path) -> Result:
    """TRL's DPOTrainer with a PEFT LoRA, the same pairs pre-tokenized (its tokenizing map skipped)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    model = build_random_qwen2(arch, torch.bfloat16 if device == "cuda" else torch.float32, device, weight_std=0.02)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    n = steps + warmup

    def answer(side: Rendered) -> list[int]:
        return [t for t in side.labels if t != -100]

    rows = [{"prompt_ids": p.chosen.input_ids[:-len(answer(p.chosen))], "chosen_ids": answer(p.chosen),
             "rejected_ids": answer(p.rejected)} for p in pairs[:n]]
    config = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=1, max_steps=n, learning_rate=1e-5,
                       gradient_checkpointing=False, bf16=device == "cuda", use_cpu=device != "cuda",
                       max_length=None, logging_steps=10**6, save_strategy="no", report_to=[],
                       dataloader_num_workers=0, seed=0)
    timer = _Timer(device, warmup)
    trainer = PreTokenized(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"),
                           callbacks=[timer.callback])
    trainer.train()
    tokens = len(pairs[0].chosen.input_ids) + len(pairs[0].rejected.input_ids)
    return Result(TRL_NAME, round(tokens * steps / sum(timer.times[warmup:]), 1), round(peak_gib(device), 2))


def run_side(side: str, opts) -> Result:
    """One side, in this process (a child of main)."""
    device = "cpu" if opts.smoke else "cuda"
    arch, prompt, answer = (dict(TINY, vocab_size=151936), 32, 32) if opts.smoke else (QWEN25_7B, 512, 512)
    n = max(opts.steps + opts.warmup, 3 * REFERENCE_BATCH)  # the reference pass: one warm-up batch, two steady
    pairs = random_pairs(n, prompt, answer, arch["vocab_size"])
    gc.collect()
    if side.startswith("lorakit"):
        return run_lorakit(arch, pairs, steps=opts.steps, warmup=opts.warmup, device=device,
                           memory_limit=opts.memory_limit, anchor=side == "lorakit")
    return run_trl(arch, pairs, steps=opts.steps, warmup=opts.warmup, device=device, out_dir=Path(opts.out))


def spawn(side: str, opts, name: str) -> Result:
    """Run one side in a child process under its time limit; a failure becomes a Result with the error."""
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(opts.steps), "--warmup", str(opts.warmup),
           "--out", opts.out] + (["--memory_limit", str(opts.memory_limit)] if opts.memory_limit else [])
    cmd += ["--smoke"] if opts.smoke else []
    started = time.perf_counter()
    try:  # stderr streams through (progress, tracebacks); stdout carries the result line
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=opts.side_timeout)
    except subprocess.TimeoutExpired:
        return Result(name, seconds=round(time.perf_counter() - started, 1),
                      error=f"timed out after {opts.side_timeout} s (--side_timeout)")
    seconds = round(time.perf_counter() - started, 1)
    lines = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        return Result(name, seconds=seconds, error=f"exit {proc.returncode}, no result (see its traceback above)")
    known = {f.name for f in fields(Result)}
    return Result(**{k: v for k, v in json.loads(lines[-1]).items() if k in known} | {"seconds": seconds})


def print_table(results: list[Result], smoke: bool) -> None:
    lorakit, trl = results[0], results[-1]
    print(f"\n{'side':<48} {'tok/s':>9} {'epoch tok/s':>12} {'ref s/pair':>11} {'one-off s':>10} {'peak GiB':>9} "
          f"{'wall s':>7}")
    for r in results:
        cells = [f"{r.tok_s:,.0f}" if r.tok_s else "-", f"{r.epoch_tok_s:,.0f}" if r.epoch_tok_s else "-",
                 f"{r.ref_pair_s:.3f}" if r.ref_pair_s else "-", f"{r.one_off_s:.1f}" if r.one_off_s is not None else "-",
                 f"{r.peak_gib:.2f}" if r.peak_gib else "-", f"{r.seconds:.0f}" if r.seconds else "-"]
        print(f"{r.name:<48} {cells[0]:>9} {cells[1]:>12} {cells[2]:>11} {cells[3]:>10} {cells[4]:>9} {cells[5]:>7}"
              + (f"  FAILED: {r.error}" if r.error else ""))
    if lorakit.ref_pair_s and lorakit.ref_eager_pair_s:
        print(f"lorakit reference pass per pair: {lorakit.ref_pair_s:.3f} s compiled, {lorakit.ref_eager_pair_s:.3f} s "
              f"eager (compilation is in one-off s)")
    if lorakit.tok_s and trl.tok_s:
        print(f"lorakit / TRL (same call): {lorakit.tok_s / trl.tok_s:.2f}x steady steps, "
              f"{lorakit.epoch_tok_s / trl.tok_s:.2f}x with lorakit's reference pass charged per pair; peak memory "
              f"{lorakit.peak_gib:.2f} vs {trl.peak_gib:.2f} GiB")
    else:
        failed = " and ".join(r.name for r in results if not r.tok_s)
        print(f"no same-call ratio: {failed} gave no figure (its error is in the table)")
    if not smoke:
        print(f"target: >= 2x TRL at no more memory (the issue's TRL figure: {TRL_REFERENCE['tok_s']:,} tok/s at "
              f"{TRL_REFERENCE['peak_gib']} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory_limit", type=float, default=28.0, help="lorakit's --gpu_memory_limit, GiB")
    parser.add_argument("--side_timeout", type=int, default=170, help="seconds each side may take")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short pairs")
    parser.add_argument("--side", choices=tuple(NAMES), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--out", default="/tmp/dpo-gpu")
    opts = parser.parse_args()
    if opts.smoke:
        opts.steps, opts.warmup = 2, 1
    if opts.side:  # a child: one side, its figures as one line on stdout
        try:
            result = run_side(opts.side, opts)
        except Exception as exc:
            traceback.print_exc()
            result = Result(NAMES[opts.side], error=f"{type(exc).__name__}: {exc}"[:300])
        print(MARK + json.dumps(asdict(result)), flush=True)
        return
    results = []
    for side, name in NAMES.items():
        results.append(spawn(side, opts, name))
        print(json.dumps(asdict(results[-1])), flush=True)
    print_table(results, opts.smoke)
    if opts.json:
        Path(opts.json).write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
