"""Every command-line flag, as small typed dataclasses, one module per group.

Each field's docstring (the string literal under it) is its `--help` text; each class checks its own
values in `__post_init__`. Commands compose groups (`SftArgs` = model + data + lora + train + fast +
dist + quant); the CLI flattens the groups into one flag namespace, so a flag name is unique across
the groups a command uses. Spellings follow ms-swift (`--lora_rank`, `--train_type`), and `ALIASES`
maps the other names people type.

  spelling.py   ALIASES, COMMA_LISTS: other spellings of a flag, list flags split at commas; only_flags
  checks.py     the checks the classes share (a choice, a positive number)
  model.py      ModelArgs (--model, dtype, device, attention, template), DataArgs (--dataset ...)
  training.py   LoraArgs (the tuner), TrainArgs (optimisation, checkpoints, logging, replay)
  fast.py       FastOptions: the GPU fast paths of training and activation recompute (one type: flags and settings)
  quant.py      QuantArgs (QLoRA), BaseQuantArgs (how infer/eval/deploy load the base), refuse_quant_combinations
  dist.py       DistArgs (--deepspeed, --fsdp, --ddp_*)
  sft.py        SftArgs, CheckDataArgs
  rlhf.py       RlhfGroup (DPO family), GrpoArgs, RlhfArgs
  inference.py  GenerationArgs, AdapterArgs, InferArgs, EvalArgs, ExportArgs, DeployArgs, WebUIArgs
  quickstart.py QuickstartArgs: sft's groups (a subset of their flags, spelling.only_flags) + RecipeArgs
"""

from lorakit.args.dist import DistArgs
from lorakit.args.fast import FastOptions
from lorakit.args.inference import (AdapterArgs, DeployArgs, EvalArgs, ExportArgs, GenerationArgs, InferArgs,
                                    WebUIArgs)
from lorakit.args.model import DataArgs, ModelArgs
from lorakit.args.quant import QUANT_METHODS, BaseQuantArgs, QuantArgs, refuse_quant_combinations
from lorakit.args.quickstart import QuickstartArgs, RecipeArgs
from lorakit.args.rlhf import (GRPO_LOSS_TYPES, RLHF_DEFAULT_BETA, RLHF_LOSS_TYPES, RLHF_TYPES, GrpoArgs, RlhfArgs,
                               RlhfGroup, refuse_other_types_flags)
from lorakit.args.sft import CheckDataArgs, SftArgs
from lorakit.args.spelling import ALIASES, COMMA_LISTS, only_flags
from lorakit.args.training import LoraArgs, TrainArgs

__all__ = [
    "ALIASES", "COMMA_LISTS", "GRPO_LOSS_TYPES", "QUANT_METHODS", "RLHF_DEFAULT_BETA", "RLHF_LOSS_TYPES", "RLHF_TYPES",
    "AdapterArgs", "BaseQuantArgs", "CheckDataArgs", "DataArgs", "DeployArgs", "DistArgs", "EvalArgs", "ExportArgs", "FastOptions",
    "GenerationArgs", "GrpoArgs", "InferArgs", "LoraArgs", "ModelArgs", "QuantArgs", "QuickstartArgs", "RecipeArgs",
    "RlhfArgs", "RlhfGroup", "SftArgs", "TrainArgs", "WebUIArgs", "only_flags", "refuse_other_types_flags",
    "refuse_quant_combinations",
]
