"""Every command-line flag, as small typed dataclasses.

Each field's docstring (the string literal under it) is its `--help` text. Commands compose
groups (`SftArgs` = model + data + lora + train + fast); the CLI flattens the groups into one
flag namespace, so a flag name is unique across the groups a command uses. Spellings follow
ms-swift (`--lora_rank`, `--train_type`), and `aliases` maps the other names people type.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields

from lorakit.errors import UserError

# Other spellings of a flag -> its canonical field name (ms-swift 4.x renamed some flags).
ALIASES = {
    "tuner_type": "train_type",
    "lora_r": "lora_rank",
    "max_seq_length": "max_length",
    "cutoff_len": "max_length",
    "model_name_or_path": "model",
    "adapter_name_or_path": "adapters",
    "ckpt_dir": "adapters",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "adapter_dir": "adapters",
    "quantization_bit": "quant_bits",  # LLaMA-Factory
}

# List flags whose values never contain a comma: `--target_modules q_proj,v_proj` means two values
# (ms-swift and PEFT accept both spellings). Paths, dataset IDs and names keep their commas.
COMMA_LISTS = {"target_modules", "modules_to_save", "layers_to_transform", "report_to"}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"--{name} {value!r} is not one of {', '.join(map(str, choices))}.")


def _check_positive(name: str, value: float | None) -> None:
    """A finite number > 0 (NaN fails every comparison, so it is named explicitly)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"--{name} must be a positive number, got {value}.")


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
        _check_choice("torch_dtype", self.torch_dtype, ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"))
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
        _check_choice("truncation_strategy", self.truncation_strategy, ("delete", "left", "right"))
        if self.max_length <= 0:
            raise UserError(f"--max_length must be positive, got {self.max_length}.")
        if self.split_dataset_ratio is not None and not 0 <= self.split_dataset_ratio < 1:
            raise UserError(f"--split_dataset_ratio must be in [0, 1), got {self.split_dataset_ratio}.")


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
        _check_choice("train_type", self.train_type, ("lora", "full"))
        if self.lora_rank <= 0:
            raise UserError(f"--lora_rank must be positive, got {self.lora_rank}.")
        if not 0 <= self.lora_dropout < 1:  # also refuses NaN
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")


QUANT_METHODS = ("bnb",)


@dataclass
class QuantArgs:
    """Quantized base weights (QLoRA): the frozen base is loaded 4- or 8-bit by bitsandbytes, LoRA trains over it."""

    quant_method: str | None = None
    "bnb (bitsandbytes): load the base model quantized. Empty: full precision (--quant_bits alone implies bnb)."
    quant_bits: int | None = None
    "4 (QLoRA, NF4 by default) or 8 (LLM.int8). LLaMA-Factory's --quantization_bit is the same flag."
    bnb_4bit_quant_type: str | None = None
    "4-bit data type: nf4 (default) or fp4."
    bnb_4bit_use_double_quant: bool | None = None
    "Quantize the 4-bit block scales too (about 0.4 bits per weight less). Default: true."
    bnb_4bit_compute_dtype: str | None = None
    "dtype the 4-bit weights are de-quantized to for each matmul: bfloat16, float16 or float32. Default: --torch_dtype."

    def __post_init__(self):
        if self.quant_method is not None:
            self.quant_method = self.quant_method.lower()
            if self.quant_method == "bitsandbytes":
                self.quant_method = "bnb"
            _check_choice("quant_method", self.quant_method, QUANT_METHODS)
        if self.quant_bits is not None and self.quant_bits not in (4, 8):
            raise UserError(f"--quant_bits {self.quant_bits}: bitsandbytes quantizes to 4 or 8 bits; use --quant_bits 4 "
                            f"(QLoRA) or --quant_bits 8.")
        if self.quant_method and self.quant_bits is None:
            raise UserError(f"--quant_method {self.quant_method} needs --quant_bits 4 or 8.")
        if self.quant_bits is not None:
            self.quant_method = self.quant_method or "bnb"
        four_bit = {"bnb_4bit_quant_type": self.bnb_4bit_quant_type, "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
                    "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant}
        given = [f"--{k}" for k, v in four_bit.items() if v is not None]
        if given and self.quant_bits != 4:
            now = "without --quant_bits" if self.quant_bits is None else f"with --quant_bits {self.quant_bits}"
            raise UserError(f"{' '.join(given)} {now}: these flags shape 4-bit weights only; add --quant_bits 4 "
                            f"(or drop them).")
        if self.bnb_4bit_quant_type is not None:
            _check_choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        if self.bnb_4bit_compute_dtype is not None:
            _check_choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype,
                          ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32"))
            self.bnb_4bit_compute_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
                self.bnb_4bit_compute_dtype, self.bnb_4bit_compute_dtype)
        if self.quant_bits == 4:
            self.bnb_4bit_quant_type = self.bnb_4bit_quant_type or "nf4"
            self.bnb_4bit_use_double_quant = True if self.bnb_4bit_use_double_quant is None else self.bnb_4bit_use_double_quant
        if self.quant_bits is not None and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"--quant_bits {self.quant_bits} needs bitsandbytes: pip install 'bitsandbytes>=0.46'.")

    @property
    def enabled(self) -> bool:
        """True when the base model loads quantized."""
        return self.quant_bits is not None


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
    gradient_checkpointing: bool | None = None
    "Recompute activations in the backward pass to save memory. Empty: on for GPU, off for CPU."
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
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, ("cosine", "linear", "constant"))
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                     "replay_max_new_tokens", "replay_weight", "replay_weight_zh"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        _check_positive("learning_rate", self.learning_rate)
        if self.max_steps <= 0:
            _check_positive("num_train_epochs", self.num_train_epochs)
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"--max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")

    def notices(self) -> list[str]:
        """One line per accepted flag that changes nothing."""
        if self.dataloader_num_workers > 0:
            return [f"note: --dataloader_num_workers {self.dataloader_num_workers} is ignored: the tokenised data "
                    f"is already in memory, so batches need no loader processes."]
        return []


@dataclass
class GenerationArgs:
    max_new_tokens: int = 512
    "Most tokens generated per reply; a reply cut here is marked as cut."
    temperature: float | None = None
    "Sampling temperature; 0 means greedy and exactly reproducible. Empty: the model's generation_config.json (greedy if it samples not)."
    top_p: float | None = None
    "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. Empty: the model's generation_config.json, else 1."
    top_k: int | None = None
    "Keep only the k most likely tokens (0: no limit). Empty: the model's generation_config.json, else 0."
    repetition_penalty: float | None = None
    "Penalty > 1 lowers the probability of tokens already in the text. Empty: the model's generation_config.json, else 1."
    seed: int = 42
    "Random seed for sampling."
    stream: bool = True
    "Print the reply token by token."

    def __post_init__(self):
        if self.temperature is not None and self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}.")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")


@dataclass
class AdapterArgs:
    adapters: list[str] = field(default_factory=list)
    "Checkpoint folder (or run folder: its last checkpoint). deploy also takes NAME=PATH pairs."
    merge_lora: bool = False
    "Merge the adapter into the base weights."
    system: str | None = None
    "System prompt (text or a .txt path). Empty: the checkpoint's, else the template's default."


@dataclass
class InferArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    query: str | None = None
    "Ask one question, print the answer and exit."
    val_dataset: list[str] = field(default_factory=list)
    "Answer every row of these datasets (batch mode); needs --result_path or writes next to the checkpoint."
    result_path: str | None = None
    "JSONL file for batch results."
    max_batch_size: int = 16
    "Rows generated together in batch mode."
    infer_backend: str = "pt"
    "pt (lorakit's own engine) or vllm (if installed)."
    vllm_max_model_len: int | None = None
    "With --infer_backend vllm: the longest prompt + reply vLLM plans memory for (its max_model_len). Empty: the model's."

    def __post_init__(self):
        _check_choice("infer_backend", self.infer_backend, ("pt", "vllm"))
        if self.vllm_max_model_len is not None:
            if self.infer_backend != "vllm":
                raise UserError("--vllm_max_model_len applies to --infer_backend vllm; lorakit's own engine "
                                "(--infer_backend pt) sizes its cache per request: drop the flag or add "
                                "--infer_backend vllm.")
            if self.vllm_max_model_len <= 0:
                raise UserError(f"--vllm_max_model_len must be positive, got {self.vllm_max_model_len}.")


@dataclass
class FastArgs:
    """GPU fast paths (lorakit.fast.FastOptions); each one can be turned off. CPU always runs the reference."""

    fused_loss: bool = True
    "Chunked lm_head + cross-entropy over the positions with a target only, never holding the full-vocabulary fp32 logits (CPU too). false: plain logits + CE."
    fused_lora: bool = True
    "GPU: LoRA projections in bf16 with fused GEMMs. false: PEFT's own LoRA forward."
    packed_attention: bool = True
    "GPU: per-sample attention on packed rows (varlen flash), cuDNN/flash SDPA otherwise. false: transformers SDPA."
    torch_compile: bool = True
    "GPU: torch.compile each decoder layer (fuses norms, RoPE, SwiGLU, adds). false: eager."
    gpu_memory_limit: float | None = None
    "GiB the automatic recompute plan keeps the peak under (when --gradient_checkpointing is empty). Empty: 92% of the card."


@dataclass
class DistArgs:
    """Several GPUs / machines (start with NPROC_PER_NODE=N, or torchrun; see lorakit.distributed)."""

    deepspeed: str | None = None
    "zero0|zero1|zero2|zero3|zero2_offload|zero3_offload (ms-swift's default-zero2 ... too) or a DeepSpeed JSON: run as its PyTorch FSDP2 equivalent (printed)."
    fsdp: list[str] = field(default_factory=list)
    "FSDP2 fully_shard: full_shard (ZeRO-3), shard_grad_op (ZeRO-2), offload (optimizer states on the CPU). Empty, on several processes: DDP for LoRA, full_shard for full fine-tuning."
    ddp_timeout: int = 1800
    "Seconds any wait on the other processes (start-up rendezvous, a collective) may last before the job fails."
    ddp_backend: str | None = None
    "nccl or gloo. Empty: nccl on GPUs, gloo on the CPU."

    def __post_init__(self):
        if self.ddp_timeout <= 0:
            raise UserError(f"--ddp_timeout must be positive, got {self.ddp_timeout}.")
        if self.ddp_backend is not None:
            _check_choice("ddp_backend", self.ddp_backend, ("nccl", "gloo"))


def refuse_quant_combinations(quant: QuantArgs, lora: LoraArgs, dist: DistArgs) -> None:
    """Quantized bases train LoRA only, and not under FSDP (sft and rlhf share the rule)."""
    if quant.enabled and lora.train_type == "full":
        raise UserError(f"--quant_bits {quant.quant_bits} with --train_type full: quantized weights cannot be "
                        f"trained. Use --train_type lora (QLoRA), or drop --quant_bits to fine-tune in full.")
    if quant.enabled and (dist.fsdp or dist.deepspeed):
        flag = f"--fsdp {' '.join(dist.fsdp)}" if dist.fsdp else f"--deepspeed {dist.deepspeed}"
        raise UserError(f"--quant_bits {quant.quant_bits} with {flag}: FSDP cannot shard bitsandbytes' quantized "
                        f"weights. Drop {flag.split()[0]} (QLoRA runs on one GPU, or one copy per GPU with "
                        f"NPROC_PER_NODE), or drop --quant_bits.")


@dataclass
class SftArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    fast: FastArgs = field(default_factory=FastArgs)
    dist: DistArgs = field(default_factory=DistArgs)
    quant: QuantArgs = field(default_factory=QuantArgs)

    def __post_init__(self):  # flags of two groups that cannot go together, refused before any weights load
        refuse_quant_combinations(self.quant, self.lora, self.dist)


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class GrpoArgs:
    """`lorakit rlhf --rlhf_type grpo`: rollouts, rewards and the clipped policy loss (ms-swift's names)."""

    num_generations: int = 8
    "Completions sampled per prompt (a group); --per_device_train_batch_size counts completions, as in TRL."
    max_completion_length: int = 512
    "Most tokens per sampled completion."
    temperature: float = 0.9
    "Sampling temperature of the rollouts (the loss scales the logits by it too)."
    top_p: float = 0.9
    "Nucleus sampling of the rollouts."
    top_k: int = 50
    "Top-k sampling of the rollouts (0: no limit)."
    repetition_penalty: float = 1.0
    "Repetition penalty of the rollouts (1: none)."
    epsilon: float = 0.2
    "Clip the probability ratio below at 1 - epsilon (and above at 1 + epsilon unless --epsilon_high)."
    epsilon_high: float | None = None
    "Upper clip 1 + epsilon_high (DAPO: 0.28). Empty: --epsilon."
    scale_rewards: str = "group"
    "Divide advantages by the std of the group (group, or true), of the batch (batch), or not at all (none, or false)."
    num_iterations: int = 1
    "Policy updates per generated batch (PPO epochs, mu)."
    steps_per_generation: int | None = None
    "Micro-batches one generation round covers. Empty: --gradient_accumulation_steps (raised to fit whole groups)."
    mask_truncated_completions: bool = False
    "Leave completions cut at --max_completion_length out of the loss (DAPO)."
    log_completions: bool = False
    "Write every prompt, completion, reward and advantage to completions.jsonl in the run folder."
    reward_funcs: list[str] = field(default_factory=list)
    "Reward functions: built-in accuracy, format, repetition, soft_overlong, cosine, or names in --external_plugins. Empty: accuracy when the data has a solution/answer column."
    reward_weights: list[float] = field(default_factory=list)
    "Weight of each reward function (default: 1 each)."
    external_plugins: list[str] = field(default_factory=list)
    "Python files defining reward functions fn(completions, **kwargs) -> list[float | None]; the dataset's columns arrive as kwargs."
    soft_max_length: int | None = None
    "soft_overlong: the length that earns -1 (default --max_completion_length)."
    soft_cache_length: int | None = None
    "soft_overlong: the penalty ramps over the last N tokens before --soft_max_length."
    repetition_n_grams: int = 3
    "repetition: n-gram size."
    repetition_max_penalty: float = -1.0
    "repetition: reward of a completion made only of repeated n-grams."
    cosine_max_len: int | None = None
    "cosine: the length at which the reward reaches its max-length values (default --max_completion_length)."
    cosine_min_len_value_wrong: float = -0.5
    "cosine: reward of a wrong answer of length 0."
    cosine_max_len_value_wrong: float = 0.0
    "cosine: reward of a wrong answer of --cosine_max_len tokens."
    cosine_min_len_value_correct: float = 1.0
    "cosine: reward of a correct answer of length 0."
    cosine_max_len_value_correct: float = 0.5
    "cosine: reward of a correct answer of --cosine_max_len tokens."
    use_vllm: bool = False
    "Accepted for ms-swift compatibility: rollouts always run on lorakit's engine in the training process (live adapter, no weight sync)."
    vllm_mode: str | None = None
    "Accepted for ms-swift compatibility (see --use_vllm)."
    vllm_gpu_memory_utilization: float | None = None
    "Accepted for ms-swift compatibility (see --use_vllm)."
    vllm_tensor_parallel_size: int | None = None
    "Accepted for ms-swift compatibility (see --use_vllm)."

    def __post_init__(self):
        self.scale_rewards = {"true": "group", "false": "none", "True": "group", "False": "none"}.get(
            str(self.scale_rewards), self.scale_rewards)
        _check_choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        for name in ("num_generations", "max_completion_length", "num_iterations", "steps_per_generation",
                     "soft_cache_length", "soft_max_length", "repetition_n_grams", "cosine_max_len"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        if self.num_generations < 2:
            raise UserError("--num_generations must be at least 2: advantages compare the completions of a prompt.")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0 for GRPO rollouts (a group of greedy answers is one answer "
                            f"repeated), got {self.temperature}.")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise UserError(f"bad sampling flags: --top_p {self.top_p} (in (0, 1]), --top_k {self.top_k} (>= 0), "
                            f"--repetition_penalty {self.repetition_penalty} (> 0).")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError("--epsilon and --epsilon_high must be >= 0.")
        if self.reward_weights and self.reward_funcs and len(self.reward_weights) != len(self.reward_funcs):
            raise UserError(f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                            f"--reward_funcs: give one weight per function.")


RLHF_TYPES = ("dpo", "orpo", "simpo", "kto", "cpo", "grpo")
# loss types per --rlhf_type (TRL 1.16's names); the first is the default
RLHF_LOSS_TYPES = {
    "dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
            "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm"),
    "cpo": ("sigmoid", "hinge", "ipo", "simpo"),
    "simpo": ("simpo",),
    "orpo": ("orpo",),
    "kto": ("kto", "apo_zero_unpaired"),
    "grpo": GRPO_LOSS_TYPES,
}
RLHF_DEFAULT_BETA = {"simpo": 2.0, "grpo": 0.04}  # ms-swift: 0.1 for the others


@dataclass
class RlhfGroup:
    """Preference-training flags (ms-swift's `swift rlhf` names and defaults)."""

    rlhf_type: str = "dpo"
    "dpo, orpo, simpo, kto, cpo, or grpo (rollouts scored by reward functions)."
    adapters: list[str] = field(default_factory=list)
    "SFT checkpoint (or run folder) to continue: it is both the starting policy and the reference. Empty: a fresh LoRA on --model, whose reference is the base model."
    ref_model: str | None = None
    "Accepted for ms-swift compatibility only as empty: the reference is always the starting policy (--adapters, else --model), with no second copy of the weights."
    beta: float | None = None
    "Strength of the preference (DPO: inverse KL weight; SimPO: reward scale; GRPO: KL weight, 0 skips the reference). Empty: 2.0 for simpo, 0.04 for grpo, 0.1 otherwise."
    loss_type: str | None = None
    "dpo: sigmoid (default), hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, sigmoid_norm; cpo: sigmoid, hinge, ipo, simpo; kto: kto, apo_zero_unpaired; grpo: grpo (default), bnpo, dr_grpo, dapo."
    label_smoothing: float = 0.0
    "Probability that a pair's label is wrong (conservative DPO/CPO, robust, exo_pair); in [0, 0.5)."
    rpo_alpha: float | None = None
    "DPO: add rpo_alpha x the chosen answer's NLL per token (RPO). Empty: no NLL term."
    simpo_gamma: float = 1.0
    "SimPO target reward margin."
    cpo_alpha: float = 1.0
    "CPO/SimPO: weight of the chosen answer's NLL per token (0: pure SimPO/CPO preference term)."
    desirable_weight: float = 1.0
    "KTO: loss weight of desirable completions."
    undesirable_weight: float = 1.0
    "KTO: loss weight of undesirable completions."

    def __post_init__(self):
        _check_choice("rlhf_type", self.rlhf_type, RLHF_TYPES)
        if self.ref_model:
            raise UserError(f"--ref_model {self.ref_model}: lorakit's reference is always the starting policy "
                            "(--adapters, else --model), computed without a second copy of the weights; drop --ref_model.")
        if self.beta is None:
            self.beta = RLHF_DEFAULT_BETA.get(self.rlhf_type, 0.1)
        if self.beta < 0 or (self.beta == 0 and self.rlhf_type != "grpo"):
            raise UserError(f"--beta must be positive, got {self.beta}" + (" (0 is GRPO's: no reference)." if
                                                                            self.beta == 0 else "."))
        allowed = RLHF_LOSS_TYPES.get(self.rlhf_type, ())
        if self.loss_type is None and allowed:
            self.loss_type = allowed[0]
        if allowed and self.loss_type not in allowed:
            raise UserError(f"--loss_type {self.loss_type!r} does not apply to --rlhf_type {self.rlhf_type}; "
                            f"use one of {', '.join(allowed)}.")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.loss_type == "exo_pair" and self.label_smoothing <= 0:
            raise UserError("--loss_type exo_pair needs --label_smoothing > 0 (e.g. 1e-3).")
        for name in ("rpo_alpha", "cpo_alpha", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.rpo_alpha is not None and self.rlhf_type not in ("dpo", "grpo"):  # grpo: refuse_other_types_flags
            raise UserError(f"--rpo_alpha applies to --rlhf_type dpo; {self.rlhf_type} has its own NLL term"
                            + (" (--cpo_alpha)." if self.rlhf_type in ("cpo", "simpo") else "."))


@dataclass
class RlhfArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    fast: FastArgs = field(default_factory=FastArgs)
    rlhf: RlhfGroup = field(default_factory=RlhfGroup)
    dist: DistArgs = field(default_factory=DistArgs)
    quant: QuantArgs = field(default_factory=QuantArgs)
    grpo: GrpoArgs = field(default_factory=GrpoArgs)

    def __post_init__(self):
        refuse_quant_combinations(self.quant, self.lora, self.dist)
        refuse_other_types_flags(self.rlhf, self.grpo)
        if self.data.packing:
            raise UserError("--packing does not apply to rlhf: the chosen and rejected answers of a pair already run "
                            "in one forward; drop --packing.")
        if self.data.loss_on_prompt:
            raise UserError("--loss_on_prompt does not apply to rlhf: the preference is between the answers.")
        if self.train.replay:
            raise UserError("--replay does not apply to rlhf (the reference policy already anchors the model).")


# flags of the preference types that GRPO has no use for, and their defaults
_PREFERENCE_ONLY = {"label_smoothing": 0.0, "rpo_alpha": None, "simpo_gamma": 1.0, "cpo_alpha": 1.0,
                    "desirable_weight": 1.0, "undesirable_weight": 1.0}


def refuse_other_types_flags(rlhf: RlhfGroup, grpo: GrpoArgs) -> None:
    """A GRPO flag with a preference type (or a preference flag with grpo) is refused, not ignored."""
    if rlhf.rlhf_type == "grpo":
        given = [name for name, default in _PREFERENCE_ONLY.items() if getattr(rlhf, name) != default]
        what = "--rlhf_type grpo"
    else:
        defaults = GrpoArgs()
        given = [f.name for f in fields(GrpoArgs) if getattr(grpo, f.name) != getattr(defaults, f.name)]
        what = f"--rlhf_type {rlhf.rlhf_type}"
    if given:
        flags = " ".join("--" + g for g in given)
        if rlhf.rlhf_type == "grpo":
            raise UserError(f"{flags}: preference-loss flags (dpo, orpo, simpo, kto, cpo); {what} has no use for "
                            f"them. Drop them.")
        raise UserError(f"{flags}: GRPO flags (sampling, rewards, clipping); they apply to --rlhf_type grpo, not "
                        f"{rlhf.rlhf_type}. Drop them.")


@dataclass
class CheckDataArgs(SftArgs):
    """check-data takes every sft flag, so a user can run the same command line through it."""


@dataclass
class EvalArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    model_name: list[str] = field(default_factory=list)
    "The new name the identity probes expect (default: the checkpoint's)."
    model_author: list[str] = field(default_factory=list)
    "The new author the identity probes expect (default: the checkpoint's)."
    eval_output: str | None = None
    "JSON file for the results (default: eval.json beside the checkpoint, or ./eval.json)."
    max_batch_size: int = 32
    "Prompts generated together."
    max_new_tokens: int = 48
    "Most tokens generated per answer (probes and general questions; quickstart's eval uses 48, so its cached base answers are reused)."

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.max_batch_size <= 0:
            raise UserError(f"--max_batch_size must be positive, got {self.max_batch_size}.")


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
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("num_train_epochs", self.num_train_epochs)
        if self.lora_layers is not None and self.lora_layers < 0:
            raise UserError(f"--lora_layers must be >= 0 (0: every layer), got {self.lora_layers}.")


@dataclass
class ExportArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    output_dir: str | None = None
    "Output folder (default: <checkpoint>-merged)."
    to_gguf: str | None = None
    "Also write a GGUF file: f16, bf16 or q8_0."
    to_ollama: bool = False
    "Also write an Ollama Modelfile (implies a GGUF file)."
    push_to_hub: str | None = None
    "Upload the result to this hub repository (needs a token and network)."
    hub_token: str | None = None
    "Hub token (default: the one huggingface_hub finds)."
    max_shard_size: str = "5GB"
    "Largest safetensors shard."


@dataclass
class DeployArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    host: str = "127.0.0.1"
    "Address to listen on."
    port: int = 8000
    "Port to listen on."
    api_key: str | None = None
    "Require 'Authorization: Bearer KEY' on every request."
    served_model_name: str | None = None
    "Name of the model in the API (default: the folder name)."
    max_concurrency: int = 16
    "Requests generated together; more wait in a bounded queue."
    max_queue: int = 64
    "Requests that may wait; past it the server answers 503 with Retry-After."
    max_new_tokens: int = 512
    "Default max_tokens when a request gives none."

    def __post_init__(self):
        if self.max_concurrency <= 0 or self.max_queue < 0:
            raise UserError(f"--max_concurrency must be positive and --max_queue >= 0, got "
                            f"{self.max_concurrency} and {self.max_queue}.")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be in 1-65535, got {self.port}.")


@dataclass
class WebUIArgs:
    host: str = "127.0.0.1"
    "Address to listen on. 0.0.0.0 opens the page to the network: anyone who reaches it can run jobs, so set --auth."
    port: int = 7860
    "Port to listen on."
    lang: str = "en"
    "Language of the labels: en or zh."
    auth: str | None = None
    "user:password asked for before the page opens."
    output_dir: str = "output"
    "Folder the page's training runs go to (the form can change it); its run folders are listed as earlier runs."

    def __post_init__(self):
        _check_choice("lang", self.lang, ("en", "zh"))
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be between 1 and 65535, got {self.port}.")
        if self.auth is not None and (":" not in self.auth or not self.auth.split(":", 1)[0]):
            raise UserError(f"--auth takes user:password (for example --auth admin:s3cret), got {self.auth!r}.")
