"""The state of a training run: what the loop reads and updates (TrainingRun), and what it returns (TrainResult).

Built by loop.start_run, stepped by loop.fit; run_checkpoint saves and resumes it, run_advice explains
its failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit import distributed
from lorakit.args import SftArgs
from lorakit.data.packing import collate
from lorakit.loss import LossOutput, MetricSums, count_loss_tokens
from lorakit.run_log import RunLog
from lorakit.schedule import StepPlan


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    train_loss: float | None
    eval_loss: float | None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model, still in memory (quickstart evaluates it without reloading)
    tokenizer: Any = None


@dataclass
class TrainingRun:
    """Everything the loop reads and updates; built by loop.start_run(), stepped by loop.run_loop()."""

    args: SftArgs
    log: RunLog
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    train_samples: list
    val_samples: list
    device: torch.device
    loss_fn: LossFn
    learning_rate: float
    warmup: int
    scaler: Any = None
    step: int = 0
    eval_loss: float | None = None
    last_checkpoint: Path | None = None
    tokens: int = 0
    par: distributed.Parallel = field(default_factory=distributed.Parallel)
    "The processes of the run and the model as the step runs it (DDP/FSDP2 wrapper); one process: no wrapper."
    collate_fn: Callable = collate
    "collate(samples, pad_id, shared_prefix=...) -> batch (lorakit rlhf: pair batches)"
    prefix_on_gpu: bool = False
    "share the rows' common start on a GPU too (rlhf: a pair's prompt, run once inside the packed forward)"
    count_fn: Callable = count_loss_tokens
    "batch -> the units the step's loss is averaged over (loss tokens; pairs for preference losses)"
    name: str = "sft"
    metrics: MetricSums = field(default_factory=MetricSums)
