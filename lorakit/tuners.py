"""Make a loaded model trainable: attach a LoRA adapter (peft) or unfreeze every weight (full)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit.args import LoraArgs
from lorakit.errors import UserError


@dataclass
class TrainableSummary:
    """How many parameters train, out of how many."""

    trainable: int
    total: int
    target_modules: list[str]

    def line(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        targets = f" in {', '.join(self.target_modules)}" if self.target_modules else ""
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.3f}%){targets}"


def output_head_names(model: nn.Module) -> set[str]:
    """Leaf names of the output head (lm_head), which all-linear leaves alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {"lm_head"}
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name.split(".")[-1])
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of every nn.Linear except the output head (what all-linear means)."""
    head = output_head_names(model)
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - head)


def _leaf_names(model: nn.Module) -> set[str]:
    return {n.split(".")[-1] for n, _ in model.named_modules() if n}


def resolve_target_modules(model: nn.Module, requested: list[str]) -> list[str]:
    """Expand all-linear and check every requested name exists in `model`."""
    linear = linear_module_names(model)
    names: list[str] = []
    for name in requested:
        if name in ("all-linear", "all_linear", "ALL"):
            names.extend(linear)
        else:
            names.append(name)
    known = _leaf_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            f"--target_modules {' '.join(unknown)}: no such module in {type(model).__name__}. "
            f"Its linear layers are: {' '.join(linear)} (or use all-linear)."
        )
    return sorted(dict.fromkeys(names))


def _check_modules_to_save(model: nn.Module, names: list[str]) -> None:
    known = _leaf_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        top = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and not list(m.children())})
        raise UserError(
            f"--modules_to_save {' '.join(unknown)}: no such module in {type(model).__name__}. "
            f"Its modules include: {' '.join(top)}."
        )


def _check_layers(model: nn.Module, layers: list[int]) -> list[int] | None:
    n = getattr(model.config, "num_hidden_layers", None)
    bad = [i for i in layers if n is not None and not 0 <= i < n]
    if bad:
        raise UserError(f"--layers_to_transform {' '.join(map(str, bad))}: the model has layers 0..{n - 1}.")
    return sorted(set(layers)) or None


def check_lora_flags(model_path: Path, lora: LoraArgs) -> None:
    """Check --target_modules, --modules_to_save and --layers_to_transform on the model built on the meta
    device (config.json only: no weights read, no memory used), so a typo costs a second, not a load."""
    if lora.train_type != "lora":
        return
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    resolve_target_modules(skeleton, lora.target_modules)
    _check_modules_to_save(skeleton, lora.modules_to_save)
    _check_layers(skeleton, lora.layers_to_transform)


def attach_tuner(model: nn.Module, lora: LoraArgs) -> tuple[nn.Module, TrainableSummary]:
    """Return the model to train: a peft LoRA wrapper, or `model` itself with every weight unfrozen."""
    if lora.train_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, summarize(model, [])
    from peft import LoraConfig, get_peft_model  # lazy: peft imports bitsandbytes, which warns on import

    targets = resolve_target_modules(model, lora.target_modules)
    _check_modules_to_save(model, lora.modules_to_save)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.lora_rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        modules_to_save=lora.modules_to_save or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        layers_to_transform=_check_layers(model, lora.layers_to_transform),
    )
    peft_model = get_peft_model(model, config)  # its deprecation warning is filtered in lorakit/__init__.py
    return peft_model, summarize(peft_model, targets)


def summarize(model: nn.Module, targets: list[str]) -> TrainableSummary:
    """Count trainable and total parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return TrainableSummary(trainable=trainable, total=total, target_modules=targets)


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates, in a stable order (resume relies on it)."""
    return [p for p in model.parameters() if p.requires_grad]
