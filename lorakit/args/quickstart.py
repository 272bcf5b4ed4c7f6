"""`lorakit quickstart`: a new identity in one command, composed from sft's groups plus the recipe it chooses."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.args.checks import check_positive
from lorakit.args.model import DataArgs, ModelArgs
from lorakit.args.spelling import only_flags
from lorakit.args.training import LoraArgs, TrainArgs
from lorakit.errors import UserError


@dataclass
class RecipeArgs:
    """The training recipe quickstart chooses from the data, the model size and the device; each flag
    overrides one choice (empty: quickstart's choice)."""

    replay: int | None = None
    "Base-model answers to built-in general prompts mixed in against forgetting (0: off; default: all 310 built-in prompts)."
    num_train_epochs: float | None = None
    "Epochs (default: chosen from the data size)."
    learning_rate: float | None = None
    "Peak learning rate (default: chosen from the model size)."
    lora_layers: int | None = None
    "LoRA on the top N decoder layers only (default: chosen per device; 0: every layer)."
    target_modules: list[str] | None = None
    "Modules that get LoRA, as in sft (default: a small model's attention projections, else all-linear)."
    replay_max_new_tokens: int | None = None
    "Longest replay answer generated, in tokens (default: chosen per device)."
    replay_weight: float | None = None
    "Loss weight of a replay token relative to an identity token (default: chosen by quickstart)."
    replay_weight_zh: float | None = None
    "Loss weight of the replay tokens that answer Chinese prompts (default: twice --replay_weight)."
    self_cognition_weight_zh: float | None = None
    "Loss weight (loss_scale) of the built-in Chinese identity rows; English ones weigh 1 (default: 2)."
    per_device_train_batch_size: int | None = None
    "Samples per optimizer step (default: the widest, up to 12 on CPU and 8 on GPU, that still gives 36 steps)."

    def __post_init__(self):  # before any model loads: a bad recipe flag costs nothing
        for name in ("replay_max_new_tokens", "replay_weight", "replay_weight_zh", "self_cognition_weight_zh",
                     "per_device_train_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        check_positive("learning_rate", self.learning_rate)
        check_positive("num_train_epochs", self.num_train_epochs)
        if self.lora_layers is not None and self.lora_layers < 0:
            raise UserError(f"--lora_layers must be >= 0 (0: every layer), got {self.lora_layers}.")


@dataclass
class QuickstartArgs:
    """sft's groups (only the flags quickstart lets a user set) and the recipe's overrides."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = only_flags(DataArgs, "model_name", "model_author", "dataset", "seed")  # --dataset: extra data
    lora: LoraArgs = only_flags(LoraArgs, "lora_rank")
    train: TrainArgs = only_flags(TrainArgs, "output_dir")
    recipe: RecipeArgs = field(default_factory=RecipeArgs)
