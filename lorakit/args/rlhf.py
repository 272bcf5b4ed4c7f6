"""`lorakit rlhf`: the preference losses (DPO family) and GRPO's rollouts and rewards, with the training groups."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from lorakit.args.checks import check_choice
from lorakit.args.dist import DistArgs
from lorakit.args.fast import FastOptions
from lorakit.args.model import DataArgs, ModelArgs
from lorakit.args.quant import QuantArgs, refuse_quant_combinations
from lorakit.args.training import LoraArgs, TrainArgs
from lorakit.errors import UserError

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

    def notices(self) -> list[str]:
        """One line per accepted flag that changes nothing."""
        given = [f"--{name}" for name in ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization",
                                          "vllm_tensor_parallel_size") if getattr(self, name)]
        if given:
            return [f"note: {' '.join(given)}: rollouts run on lorakit's own engine in the training process (the live "
                    f"adapter, no weight sync, no second copy of the model); vLLM is not used."]
        return []

    def __post_init__(self):
        self.scale_rewards = {"true": "group", "false": "none", "True": "group", "False": "none"}.get(
            str(self.scale_rewards), self.scale_rewards)
        check_choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
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
# DPO's NLL weight when --rpo_alpha is empty: pure DPO lowers the chosen answer as well as the rejected one and,
# on a small set, collapsed SmolLM2's first tokens (docs/rlhf.md); LLaMA-Factory's DPO examples use pref_ftx 1.0
DPO_DEFAULT_RPO_ALPHA = 1.0
# --replay_kl when empty: the weight that kept 40 of 44 general answers with the habit learned, on two seeds of the
# habit set (docs/rlhf.md)
DEFAULT_REPLAY_KL = {"dpo": 3.0, "orpo": 1.0, "simpo": 1.0, "cpo": 1.0, "kto": 1.0}


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
    "DPO: add rpo_alpha x the chosen answer's NLL per token (RPO; TRL's loss_type [sigmoid, sft]). Empty: 1.0, which keeps the chosen answer likely (pure DPO lowers both answers and can collapse the first tokens); 0: pure DPO."
    simpo_gamma: float = 1.0
    "SimPO target reward margin."
    cpo_alpha: float = 1.0
    "CPO/SimPO: weight of the chosen answer's NLL per token (0: pure SimPO/CPO preference term)."
    desirable_weight: float = 1.0
    "KTO: loss weight of desirable completions."
    undesirable_weight: float = 1.0
    "KTO: loss weight of undesirable completions."
    replay_kl: float | None = None
    "Weight of the replay anchor: a KL to the starting policy on its own answers to built-in general prompts, so the preference moves little else. Empty: 3 for dpo, 1 for orpo, simpo, cpo and kto, 0 (off) for grpo (docs/rlhf.md); 0 turns it off."

    def __post_init__(self):
        check_choice("rlhf_type", self.rlhf_type, RLHF_TYPES)
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
        for name in ("rpo_alpha", "cpo_alpha", "desirable_weight", "undesirable_weight", "replay_kl"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.rpo_alpha is not None and self.rlhf_type not in ("dpo", "grpo"):  # grpo: refuse_other_types_flags
            raise UserError(f"--rpo_alpha applies to --rlhf_type dpo; {self.rlhf_type} has its own NLL term"
                            + (" (--cpo_alpha)." if self.rlhf_type in ("cpo", "simpo") else "."))
        if self.rpo_alpha is None and self.rlhf_type == "dpo":
            self.rpo_alpha = DPO_DEFAULT_RPO_ALPHA
        if self.replay_kl is None:
            self.replay_kl = DEFAULT_REPLAY_KL.get(self.rlhf_type, 0.0)


@dataclass
class RlhfArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    fast: FastOptions = field(default_factory=FastOptions)
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
        replay = [f"--{name}" for name in ("replay", "replay_max_new_tokens", "replay_weight", "replay_weight_zh")
                  if getattr(self.train, name) != getattr(_TRAIN_DEFAULTS, name)]
        if replay:
            raise UserError(f"{' '.join(replay)}: sft's replay flags do not apply to rlhf, which has its own anchor "
                            f"(--replay_kl WEIGHT: a KL to the starting policy on its own general answers); drop them.")
        if self.data.dataset_num_proc != 1:
            raise UserError(f"--dataset_num_proc {self.data.dataset_num_proc}: rlhf renders its pairs in one process "
                            f"(the flag parallelises sft's rendering); drop it.")


_TRAIN_DEFAULTS = TrainArgs()


# flags of the preference types that GRPO has no use for, and their defaults
_PREFERENCE_ONLY = {"label_smoothing": 0.0, "rpo_alpha": None, "simpo_gamma": 1.0, "cpo_alpha": 1.0,
                    "desirable_weight": 1.0, "undesirable_weight": 1.0, "replay_kl": 0.0}


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
