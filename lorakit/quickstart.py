"""`lorakit quickstart`: a new identity in one command, proven on held-out probes, nothing else lost.

Top to bottom: load the base model; baseline (the base's answers to the probes and general
questions, cached per model); replay rows (the base's own answers to general prompts, cached);
LoRA training through `lorakit.train.train` on self-cognition + replay + the user's datasets;
eval of the trained adapter; before/after table and report files in the run folder.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import lorakit.model as model_lib
from lorakit.args import QuickstartArgs, SftArgs
from lorakit.data import sources
from lorakit.errors import UserError
from lorakit.evaluate import EvalResult, evaluate, missed_targets, read_jsonl
from lorakit.loader import LoadedModel, open_model
from lorakit.replay import REPLAY_MAX_NEW_TOKENS, ReplayAnswer, answers_to_samples, load_general_prompts, replay_answers
from lorakit.report import Report, figures_table, print_missed, system_title, write_report
from lorakit.train import train
from lorakit.tuners import linear_module_names, resolve_target_modules

MIN_STEPS = 36  # measured on SmolLM2: 37 steps of 12 rows learn the identity; the tutorial's 10 steps teach nothing
MAX_BATCH = {"cpu": 12}  # per device type; 8 elsewhere (a 7B model at lr 2e-4 gets 55 steps, not 37)
MAX_EPOCHS = 6
REPLAY_WEIGHT = 1.5  # loss weight of a replay token relative to an identity token (1.0 leaked more: experiments/results)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Chinese replay answers weigh twice as much: SmolLM2 hardly speaks Chinese, so its own Chinese answers hold
# little in place and Chinese general questions drew the new self-introduction (leak 4-5% -> 2-3%, and
# retention 88.6% -> 90.9-93.2%, "Nova" and "Lumen" at seed 42 on the CPU; experiments/results/sweep12-cpu9*).
REPLAY_ZH_FACTOR = 2.0
# The same for what is new: the built-in Chinese identity rows weigh twice the English ones, so Chinese keeps
# English's identity-to-replay ratio. At 1, Chinese identity under unseen system prompts was 84.4-93.8% at seeds
# 1 and 2; at 2, 96.9-100% at seeds 42, 1 and 2, retention 370 vs 368 of 396 answers, leak 10 vs 6 of 900 (max 2%
# vs 3%). Weighting the Chinese general rows too cost retention (experiments/identity_zh/README.md).
SELF_COGNITION_ZH_WEIGHT = 2.0
BASELINE_PROBES = 4  # identity probes per language asked of the base model (its answers are shown; it scores 0)


@dataclass
class Recipe:
    """Training settings quickstart chose, and why."""

    num_train_epochs: float
    learning_rate: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    lora_rank: int
    lora_alpha: int
    layers_to_transform: list[int]
    target_modules: list[str]
    replay_max_new_tokens: int
    replay_weight: float
    replay_weight_zh: float
    self_cognition_weight_zh: float
    reason: str


def default_learning_rate(n_params: int) -> float:
    """LoRA learning rate by model size: small models need a much larger step to move at all."""
    if n_params < 1e9:  # SmolLM2-135M, LoRA on attention, batch 12 (1.5e-3 missed "Xiao Huang"; experiments/results)
        return 2e-3
    if n_params < 20e9:
        return 2e-4
    return 1e-4


def default_target_modules(n_params: int, module_names: set[str]) -> list[str]:
    """Where LoRA goes: a small model's attention projections only, when it has them; else every linear layer.

    Measured on SmolLM2-135M (experiments/results/sweep11-*): with LoRA on the attention projections it kept
    more of its general answers at the same identity (retention 88.6-97.7% over six seeds against 90.9%
    at three on every linear layer; on the CPU at seed 42, 88.6-93.2% against 84.1-86.4%): the MLPs,
    where such a model keeps its facts, stay as they were. A 7B model keeps ms-swift's default
    (all-linear): nothing was measured there.
    """
    if n_params < 1e9 and set(ATTENTION) <= module_names:
        return list(ATTENTION)
    return ["all-linear"]


def lora_targets(args: QuickstartArgs, model, n_params: int) -> list[str]:
    """--target_modules, checked against the loaded model before any generation or training; else the default."""
    if args.recipe.target_modules:
        resolve_target_modules(model, args.recipe.target_modules)  # fails now, not after the replay answers
        return list(args.recipe.target_modules)
    return default_target_modules(n_params, set(linear_module_names(model)))


def choose_recipe(n_rows: int, n_params: int, device_type: str, *, n_layers: int = 0, lora_rank: int = 8,
                  epochs: float | None = None, learning_rate: float | None = None, batch_size: int | None = None,
                  lora_layers: int | None = None, target_modules: list[str] | None = None,
                  replay_max_new_tokens: int | None = None,
                  replay_weight: float | None = None, replay_weight_zh: float | None = None,
                  self_cognition_weight_zh: float | None = None) -> Recipe:
    """Epochs, learning rate and batch size from the data size, model size and device.

    Enough optimizer steps matter more than epochs: ten steps teach nothing however many epochs
    they span. The batch is the widest (up to MAX_BATCH) that still gives MIN_STEPS steps in one
    epoch: wide batches are faster on a GPU and on a CPU too (the rows of a micro-batch share their
    system prompt's forward, and per-operation overhead is spread over more tokens: SmolLM2 on 2
    cores trains 103 tok/s at batch 2, 183 at batch 8, 144 at 8 without grouping by length).
    Epochs are then raised until the run has at least MIN_STEPS steps (at most MAX_EPOCHS).
    """
    batch = batch_size or max(1, min(MAX_BATCH.get(device_type, 8), n_rows // MIN_STEPS))
    steps_per_epoch = max(1, math.ceil(n_rows / batch))
    auto_epochs = min(MAX_EPOCHS, max(1, math.ceil(MIN_STEPS / steps_per_epoch)))
    lr = learning_rate if learning_rate is not None else default_learning_rate(n_params)
    chosen = epochs if epochs is not None else auto_epochs
    reason = (f"{n_rows} rows / batch {batch} = {steps_per_epoch} steps per epoch; {chosen:g} epochs -> "
              f"{math.ceil(chosen * steps_per_epoch)} steps (aim >= {MIN_STEPS}); lr {lr:g} for a "
              f"{n_params / 1e6:.0f}M-parameter model")
    top = lora_layers if lora_layers is not None else 0
    layers = list(range(n_layers - top, n_layers)) if 0 < top < n_layers else []
    if layers:
        reason += f"; LoRA on the top {top} of {n_layers} layers"
    modules = list(target_modules or ["all-linear"])
    weight = replay_weight if replay_weight is not None else REPLAY_WEIGHT
    reason += f"; LoRA on {' '.join(modules)}"
    return Recipe(num_train_epochs=chosen, learning_rate=lr, per_device_train_batch_size=batch,
                  gradient_accumulation_steps=1, lora_rank=lora_rank, lora_alpha=4 * lora_rank,
                  layers_to_transform=layers, target_modules=modules,
                  replay_max_new_tokens=replay_max_new_tokens or REPLAY_MAX_NEW_TOKENS,
                  replay_weight=weight, replay_weight_zh=replay_weight_zh or REPLAY_ZH_FACTOR * weight,
                  self_cognition_weight_zh=(self_cognition_weight_zh if self_cognition_weight_zh is not None
                                            else SELF_COGNITION_ZH_WEIGHT),
                  reason=reason)


def self_cognition_rows() -> int:
    """Rows in the built-in self-cognition file."""
    return len(read_jsonl(sources.SELF_COGNITION_FILE))


def sft_args_for(args: QuickstartArgs, recipe: Recipe, datasets: list[str], replay: int = 0) -> SftArgs:
    """The `sft` flags quickstart trains with (the same code path as `lorakit sft`): its groups with the recipe in."""
    return SftArgs(
        model=args.model,
        data=replace(args.data, dataset=datasets, split_dataset_ratio=0.0, max_length=1024,
                     self_cognition_weight_zh=recipe.self_cognition_weight_zh),
        lora=replace(args.lora, lora_rank=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                     target_modules=recipe.target_modules, layers_to_transform=recipe.layers_to_transform),
        train=replace(args.train, num_train_epochs=recipe.num_train_epochs, learning_rate=recipe.learning_rate,
                      per_device_train_batch_size=recipe.per_device_train_batch_size,
                      gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                      warmup_ratio=0.05, group_by_length=True, logging_steps=1, save_steps=10**9, report_to=["none"],
                      replay=replay, replay_max_new_tokens=recipe.replay_max_new_tokens,
                      replay_weight=recipe.replay_weight, replay_weight_zh=recipe.replay_weight_zh),
    )


def sample_answers(result: EvalResult, k: int = 2) -> list[dict[str, str]]:
    """A few probe replies per language, then one per language under each other system prompt (its "system"
    says which), for the terminal and the report."""
    out = []
    for lang in ("en", "zh"):
        out += [{"query": p.query, "reply": p.reply} for p in result.probes if p.lang == lang][:k]
    for other in result.other_systems:
        for lang in ("en", "zh"):
            out += [{"query": p.query, "reply": p.reply, "system": system_title(other.figures())}
                    for p in other.probes if p.lang == lang][:1]
    return out


def print_answers(title: str, answers: list[dict[str, str]]) -> None:
    print(title)
    for a in answers:
        reply = a["reply"].replace("\n", " ")
        under = f"  [{a['system']}]" if "system" in a else ""
        print(f"  Q: {a['query']}{under}\n  A: {reply[:200]}")


class Stopwatch:
    """Wall and process-CPU seconds per stage (CPU time: what a stage costs on a machine nobody shares)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[stage], self.cpu[stage] = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def load_base(args: QuickstartArgs) -> LoadedModel:
    """The base model, through the loader every command uses."""
    return open_model(args.model, command="quickstart")


def training_mix(args: QuickstartArgs, model, tokenizer, max_new_tokens: int) -> tuple[list[str], list[ReplayAnswer]]:
    """(--dataset specs: self-cognition and the user's data, the base's replay answers). The answers are
    generated here, with the base model already loaded (cached per model), and handed to training."""
    n_replay = args.recipe.replay if args.recipe.replay is not None else len(load_general_prompts())  # all of them
    print(f"[2/5] training mix: self-cognition + {n_replay} replay prompts + {len(args.data.dataset)} extra datasets",
          file=sys.stderr)
    answers = []
    if n_replay > 0:
        answers = replay_answers(model, tokenizer, n_replay, system=None, cache_dir=model_lib.CACHE_DIR / "replay",
                                 max_new_tokens=max_new_tokens)
    return ["self-cognition", *args.data.dataset], answers


def quickstart(args: QuickstartArgs) -> Report:
    """Run the whole flow; returns the report written into the run folder."""
    name, author = args.data.model_name, args.data.model_author
    if not name or not author:
        raise UserError("quickstart needs --model_name and --model_author, e.g. --model_name Lumen --model_author "
                        "'Acme Labs' (or a Chinese and an English value each: --model_name 小光 Lumen).")
    clock, cache = Stopwatch(), model_lib.CACHE_DIR / "quickstart"
    base = load_base(args)
    model_path, tokenizer, model, device = base.base_path, base.tokenizer, base.model, base.model.device
    del base  # the base weights are freed before training loads its own copy (`del model` below)
    n_params = sum(p.numel() for p in model.parameters())
    clock.lap("load base model")

    print(f"[1/5] baseline: {model_path.name} ({n_params / 1e6:.0f}M parameters) on {device}", file=sys.stderr)
    before = evaluate(model, tokenizer, name=name, author=author, is_base=True, cache_dir=cache,
                      probes_per_lang=BASELINE_PROBES)
    print_answers("Before training, the base model says:", sample_answers(before))
    clock.lap("baseline")

    n_layers = getattr(model.config, "num_hidden_layers", 0)
    r = args.recipe
    plan = dict(n_layers=n_layers, lora_rank=args.lora.lora_rank, epochs=r.num_train_epochs,
                learning_rate=r.learning_rate, batch_size=r.per_device_train_batch_size,
                lora_layers=r.lora_layers, replay_max_new_tokens=r.replay_max_new_tokens,
                target_modules=lora_targets(args, model, n_params),
                replay_weight=r.replay_weight, replay_weight_zh=r.replay_weight_zh,
                self_cognition_weight_zh=r.self_cognition_weight_zh)
    datasets, answers = training_mix(args, model, tokenizer, r.replay_max_new_tokens or REPLAY_MAX_NEW_TOKENS)
    replay_rows = len(answers)
    del model  # train() loads its own copy; never hold two on a GPU
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    clock.lap("replay answers")

    recipe = choose_recipe(self_cognition_rows() + replay_rows, n_params, device.type, **plan)
    print(f"[3/5] LoRA training: {recipe.reason}", file=sys.stderr)
    replay = answers_to_samples(answers, weight=recipe.replay_weight, weight_zh=recipe.replay_weight_zh)
    result = train(sft_args_for(args, recipe, datasets, replay=replay_rows), replay=replay)
    clock.lap("training")
    infer_command = f"lorakit infer --adapters {result.last_checkpoint}"

    print("[4/5] eval on held-out probes and general questions", file=sys.stderr)
    try:
        after = evaluate(result.model, result.tokenizer, name=name, author=author,
                         cache_dir=cache)
    except KeyboardInterrupt:
        print(f"\ninterrupted during eval; the trained checkpoint is usable:\n  {infer_command}", file=sys.stderr)
        raise
    clock.lap("eval")

    report = Report(
        model=str(model_path), name=after.name, author=after.author, checkpoint=str(result.last_checkpoint),
        infer_command=infer_command, before=before.figures(), after=after.figures(),
        recipe=asdict(recipe) | {"steps": result.steps, "datasets": datasets, "replay_rows": replay_rows,
                                 "cpu_seconds": clock.cpu, "baseline_parts": before.stage_seconds,
                                 "eval_parts": after.stage_seconds},
        timings=clock.wall | {"total": sum(clock.wall.values())}, baseline_answers=sample_answers(before),
        after_answers=sample_answers(after), log_history=result.log_history, missed=missed_targets(after),
        retention_lost=[{"question": r.question, "base_reply": r.base_reply, "reply": r.reply}
                        for r in after.retention_rows if r.base_correct and not r.correct],
    )
    finish(report, after, result.run_dir)
    return report


def finish(report: Report, after: EvalResult, run_dir: Path) -> None:
    """Write report.md/.json/.png and eval.json; print the before/after table and the chat command."""
    write_report(report, run_dir)
    (run_dir / "eval.json").write_text(_json(after.to_json()), encoding="utf-8")
    print("[5/5] before / after", file=sys.stderr)
    print_answers("After training, the model says:", report.after_answers)
    print(figures_table(report.before, report.after))
    print_missed(report.missed)
    print(f"report: {run_dir / 'report.md'}  (took {report.timings['total']:.0f} s)")
    print(f"chat with it:\n  {report.infer_command}")


def _json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(args: QuickstartArgs) -> int:
    """`lorakit quickstart`."""
    quickstart(args)
    return 0
