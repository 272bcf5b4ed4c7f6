"""The base model (--model, dtype, device, attention, template) and the training data (--dataset ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorakit.args.checks import check_choice
from lorakit.errors import UserError


def _dtype_from_precision_flags(torch_dtype: str, bf16: bool | None, fp16: bool | None) -> str:
    """--bf16/--fp16 (HF Trainer and ms-swift spellings) -> --torch_dtype; contradictions are refused."""
    if bf16 and fp16:
        raise UserError("--bf16 true and --fp16 true contradict each other: pick one (or --torch_dtype).")
    wanted = "bfloat16" if bf16 else "float16" if fp16 else None
    for flag, on, dtype in (("bf16", bf16, "bfloat16"), ("fp16", fp16, "float16")):
        if on is False and torch_dtype == dtype:
            raise UserError(f"--{flag} false contradicts --torch_dtype {torch_dtype}: drop one of them.")
    if wanted is None:
        return torch_dtype
    if torch_dtype not in ("auto", wanted):
        flag = "bf16" if bf16 else "fp16"
        raise UserError(f"--{flag} true contradicts --torch_dtype {torch_dtype}: drop one of them.")
    return wanted


@dataclass
class ModelArgs:
    model: str | None = None
    "Base model: a local Hugging Face folder, a hub ID, or a .gguf file. Empty: the embedded SmolLM2-135M-Instruct."
    gguf_file: str | None = None
    "Name of the .gguf file inside --model's folder (transformers de-quantises it)."
    use_hf: bool | None = None
    "Hub to download from: true the Hugging Face hub, false ModelScope. Empty: ModelScope for dataset IDs (as ms-swift), the Hugging Face hub for models."
    torch_dtype: str = "auto"
    "auto (bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU), bfloat16, float16 or float32."
    device: str | None = None
    "cuda, cuda:N, cpu or mps. Empty: the first GPU if there is one, else the CPU."
    attn_impl: str = "sdpa"
    "Attention implementation passed to transformers: sdpa (default), eager or flash_attention_2."
    template: str | None = None
    "Chat template: empty uses the tokenizer's own; 'chatml' is the built-in fallback for tokenizers without one."
    model_type: str | None = None
    "Accepted for ms-swift compatibility and ignored: the architecture comes from config.json."
    bf16: bool | None = None
    "HF/ms-swift spelling of --torch_dtype bfloat16 (true); false only refuses a bfloat16 --torch_dtype."
    fp16: bool | None = None
    "HF/ms-swift spelling of --torch_dtype float16 (true); false only refuses a float16 --torch_dtype."

    def __post_init__(self):
        check_choice("torch_dtype", self.torch_dtype, ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"))
        self.torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.torch_dtype, self.torch_dtype)
        self.torch_dtype = _dtype_from_precision_flags(self.torch_dtype, self.bf16, self.fp16)

    def notices(self) -> list[str]:
        """One line per accepted flag that changes nothing."""
        if self.model_type:
            return [f"note: --model_type {self.model_type} is ignored: lorakit reads the architecture from the "
                    f"model's config.json."]
        return []


@dataclass
class DataArgs:
    dataset: list[str] = field(default_factory=list)
    "Training data: files (.json/.jsonl/.csv/.parquet), hub IDs or built-in names, each optionally PATH#N to sample N rows."
    val_dataset: list[str] = field(default_factory=list)
    "Validation data, same forms as --dataset."
    split_dataset_ratio: float | None = None
    "Share of --dataset held out for validation. Empty: 0 for datasets under 500 rows, else 0.01."
    max_length: int = 2048
    "Longest sample in tokens; longer samples follow --truncation_strategy."
    truncation_strategy: str = "delete"
    "delete (drop the row), left (cut the start) or right (cut the end) for samples over --max_length."
    packing: bool = False
    "Pack samples into --max_length bins with attention kept within each sample."
    system: str | None = None
    "System prompt (text, or a path to a .txt file) used where a row has none. Empty: the template's default."
    loss_on_prompt: bool = False
    "Train on every token, not only on the assistant's replies."
    model_name: list[str] = field(default_factory=list)
    "Your model's name for the built-in self-cognition data: one value, or a Chinese and an English value."
    model_author: list[str] = field(default_factory=list)
    "Your model's author for the built-in self-cognition data: one value, or a Chinese and an English value."
    self_cognition_weight_zh: float = 1.0
    "Loss weight (loss_scale) of the built-in self-cognition's Chinese identity rows; its other rows weigh 1."
    seed: int = 42
    "Random seed for sampling, shuffling, initialisation and dropout."
    dataset_num_proc: int = 1
    "Processes used to tokenise the data."
    data_cache: bool = True
    "Cache tokenised data on disk, keyed by file contents, tokenizer, template and flags."
    streaming: bool = False
    "Accepted for ms-swift compatibility; datasets are read whole."

    def notices(self) -> list[str]:
        """One line per accepted flag that changes nothing."""
        if self.streaming:
            return ["note: --streaming true is ignored: lorakit reads each dataset whole (tokenised once, cached)."]
        return []

    def __post_init__(self):
        check_choice("truncation_strategy", self.truncation_strategy, ("delete", "left", "right"))
        if self.max_length <= 0:
            raise UserError(f"--max_length must be positive, got {self.max_length}.")
        if not (math.isfinite(self.self_cognition_weight_zh) and self.self_cognition_weight_zh >= 0):
            raise UserError(f"--self_cognition_weight_zh must be a number >= 0, got {self.self_cognition_weight_zh}.")
        if self.split_dataset_ratio is not None and not 0 <= self.split_dataset_ratio < 1:
            raise UserError(f"--split_dataset_ratio must be in [0, 1), got {self.split_dataset_ratio}.")
