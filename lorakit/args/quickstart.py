"""`lorakit quickstart`: a new identity in one command (the recipe flags it lets a user change)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.args.checks import check_positive
from lorakit.args.model import ModelArgs
from lorakit.errors import UserError


@dataclass
class QuickstartArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    model_name: list[str] = field(default_factory=list)
    "Your model's name: one value, or a Chinese and an English value."
    model_author: list[str] = field(default_factory=list)
    "Your model's author: one value, or a Chinese and an English value."
    dataset: list[str] = field(default_factory=list)
    "Extra training data mixed in (any --dataset form)."
    replay: int | None = None
    "Base-model answers to built-in general prompts mixed in against forgetting (0: off; default: all 310 built-in prompts)."
    output_dir: str = "output"
    "Folder that receives the run folder."
    num_train_epochs: float | None = None
    "Epochs (default: chosen from the data size)."
    learning_rate: float | None = None
    "Peak learning rate (default: chosen from the model size)."
    lora_rank: int = 8
    "LoRA rank r."
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
    per_device_train_batch_size: int | None = None
    "Samples per optimizer step (default: the widest, up to 12 on CPU and 8 on GPU, that still gives 36 steps)."
    seed: int = 42
    "Random seed."

    def __post_init__(self):  # before any model loads: a bad recipe flag costs nothing
        for name in ("replay_max_new_tokens", "replay_weight", "replay_weight_zh", "per_device_train_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        check_positive("learning_rate", self.learning_rate)
        check_positive("num_train_epochs", self.num_train_epochs)
        if self.lora_layers is not None and self.lora_layers < 0:
            raise UserError(f"--lora_layers must be >= 0 (0: every layer), got {self.lora_layers}.")
