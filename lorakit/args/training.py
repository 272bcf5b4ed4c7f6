"""The tuner (--train_type, --lora_*) and the optimisation loop (--learning_rate, --save_steps ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorakit.args.checks import check_choice, check_positive
from lorakit.errors import UserError


@dataclass
class LoraArgs:
    train_type: str = "lora"
    "lora (default) or full. ms-swift 4.x calls this --tuner_type; both are accepted."
    lora_rank: int = 8
    "LoRA rank r."
    lora_alpha: int = 32
    "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with --use_rslora)."
    lora_dropout: float = 0.05
    "Dropout on the LoRA input."
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    "Modules to adapt: all-linear (every linear layer except the output head) or module names such as q_proj v_proj."
    modules_to_save: list[str] = field(default_factory=list)
    "Modules trained in full and saved beside the adapter, e.g. embed_tokens lm_head."
    use_rslora: bool = False
    "Rank-stabilised LoRA scaling (alpha / sqrt(r))."
    use_dora: bool = False
    "Weight-decomposed LoRA (DoRA)."
    layers_to_transform: list[int] = field(default_factory=list)
    "Decoder layer indices that get LoRA (empty: all); e.g. the top layers only, so backward stops there."

    def __post_init__(self):
        check_choice("train_type", self.train_type, ("lora", "full"))
        if self.lora_rank <= 0:
            raise UserError(f"--lora_rank must be positive, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:  # also refuses NaN
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass
class TrainArgs:
    output_dir: str = "output"
    "Folder that receives the run folder vN-YYYYMMDD-HHMMSS/."
    num_train_epochs: float = 1.0
    "Passes over the training data (ignored when --max_steps is set)."
    max_steps: int = -1
    "Optimizer steps to run; -1 means use --num_train_epochs."
    per_device_train_batch_size: int = 1
    "Samples per micro-batch."
    per_device_eval_batch_size: int = 1
    "Samples per evaluation batch."
    gradient_accumulation_steps: int = 1
    "Micro-batches per optimizer step; the loss is normalised over all loss tokens of the step."
    learning_rate: float | None = None
    "Peak learning rate. Empty: 1e-4 for LoRA, 1e-5 for full fine-tuning."
    weight_decay: float = 0.0
    "AdamW weight decay."
    adam_beta1: float = 0.9
    "AdamW beta1."
    adam_beta2: float = 0.999
    "AdamW beta2."
    lr_scheduler_type: str = "cosine"
    "cosine, linear or constant (after warm-up)."
    warmup_ratio: float = 0.0
    "Share of the steps spent warming up the learning rate linearly from 0."
    warmup_steps: int = 0
    "Warm-up steps (wins over --warmup_ratio when set)."
    max_grad_norm: float = 1.0
    "Clip the gradient norm to this value; 0 disables clipping."
    logging_steps: int = 5
    "Write a line to logging.jsonl every N optimizer steps."
    eval_steps: int | None = None
    "Evaluate on the validation set every N steps. Empty: same as --save_steps."
    save_steps: int = 500
    "Save a checkpoint every N optimizer steps (and always at the end)."
    save_total_limit: int | None = None
    "Keep only the newest N checkpoints, plus the best by eval loss."
    save_only_model: bool = False
    "Save weights without optimizer state (smaller; such a checkpoint cannot be resumed exactly)."
    resume_from_checkpoint: str | None = None
    "Checkpoint (or run folder) to continue exactly: weights, optimizer, scheduler, RNG and data order."
    resume_only_model: bool = False
    "With --resume_from_checkpoint: load only the weights and start a new run."
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    "Where to log: tensorboard, wandb, none."
    group_by_length: bool = False
    "Batch samples of similar length together (less padding; order still shuffled per epoch)."
    dataloader_num_workers: int = 0
    "Accepted for compatibility; tokenised data is already in memory, so it is not needed."
    replay: int = 0
    "Mix in the base model's own answers to N built-in general prompts, learned as its distributions (keeps general ability)."
    replay_max_new_tokens: int = 24
    "Longest replay answer, in tokens (each answer token carries the base's top-20 distribution)."
    replay_weight: float = 1.0
    "Loss weight of a replay token relative to a token of your data (below 1: your data counts for more)."
    replay_weight_zh: float | None = None
    "Loss weight of the replay tokens that answer Chinese prompts (default: --replay_weight)."
    dry_run: bool = False
    "Load and check the data, print the summary, and stop before loading weights."
    add_version: bool = True
    "Write into a new vN-YYYYMMDD-HHMMSS folder inside --output_dir."

    def __post_init__(self):
        check_choice("lr_scheduler_type", self.lr_scheduler_type, ("cosine", "linear", "constant"))
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                     "replay_max_new_tokens", "replay_weight", "replay_weight_zh"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        check_positive("learning_rate", self.learning_rate)
        if self.max_steps <= 0:
            check_positive("num_train_epochs", self.num_train_epochs)
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")

    def notices(self) -> list[str]:
        """One line per accepted flag that changes nothing."""
        lines = []
        if self.dataloader_num_workers > 0:
            lines.append(f"note: --dataloader_num_workers {self.dataloader_num_workers} is ignored: the tokenised data "
                         f"is already in memory, so batches need no loader processes.")
        defaults = TrainArgs()
        replay = [f"--{name}" for name in ("replay_max_new_tokens", "replay_weight", "replay_weight_zh")
                  if getattr(self, name) != getattr(defaults, name)]
        if replay and not self.replay:
            lines.append(f"note: {' '.join(replay)} changes nothing without --replay N (the number of the base's "
                         f"answers to mix in); add --replay to use replay.")
        return lines
