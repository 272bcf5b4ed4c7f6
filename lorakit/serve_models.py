"""The models `lorakit deploy` serves: one base model and its LoRA adapters, named for the API.

The first adapter (or the base) opens through lorakit.loader; further adapters load into the same
peft model (`load_adapter`), and `active_adapter` switches between them (or turns them off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.args import DeployArgs
from lorakit.data.render import strip_system_markers
from lorakit.errors import UserError
from lorakit.infer.engine import Engine
from lorakit.loader import find_adapter, open_model, resolve_system, saved_args


@dataclass
class ServedModel:
    """One name in /v1/models: the base (adapter None) or one LoRA adapter over it."""

    name: str
    adapter: str | None
    system: str | None
    path: str


@dataclass
class Served:
    """What `lorakit deploy` serves: one model (adapters loaded into it), its engine, the API names."""

    model: Any
    tokenizer: Any
    engine: Any
    models: dict[str, ServedModel]
    context: int


def _adapter_specs(adapters: list[str]) -> list[tuple[str | None, str]]:
    """--adapters values as (name or None, path): NAME=PATH pairs or plain paths."""
    specs = []
    for item in adapters:
        name, sep, path = item.partition("=")
        specs.append((name, path) if sep and name and not Path(item).exists() else (None, item))
    return specs


def _served_name(ckpt: Path) -> str:
    """A checkpoint's default API name: its run folder for checkpoint-N, else the folder itself."""
    return ckpt.parent.name if ckpt.name.startswith("checkpoint-") else ckpt.name


def public_name(path: Path) -> str:
    """'run/checkpoint-N' for a checkpoint, else the folder's own name: what /v1/models may show."""
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def load_served(args: DeployArgs) -> Served:
    """Load the base model and every adapter (the first through lorakit.loader); name them for the API."""
    system = resolve_system(args.adapter.system)
    specs = _adapter_specs(args.adapter.adapters)
    merge = args.adapter.merge_lora and len(specs) == 1
    first = open_model(args.model, [specs[0][1]] if specs else [], system=args.adapter.system, merge_lora=merge,
                       base_quant=args.base_quant, command="deploy")
    model, tokenizer = first.model, first.tokenizer
    models: dict[str, ServedModel] = {}
    if not specs:
        name = args.served_model_name or first.base_path.name
        models[name] = ServedModel(name, None, system, str(first.base_path))
    else:
        base_path = first.base_path or Path(first.saved.model_path or first.checkpoint)
        ckpts = [first.checkpoint] + [find_adapter(path) for _, path in specs[1:]]
        for i, ((name, _), ckpt) in enumerate(zip(specs, ckpts)):
            saved = first.saved if i == 0 else saved_args(ckpt)
            if saved.model_path and Path(saved.model_path).resolve() != base_path.resolve():
                raise UserError(f"--adapters {ckpt}: trained on {saved.model_path}, but the served base is "
                                f"{base_path}; all adapters of one server must share the base model.")
            if i > 0:
                model.load_adapter(str(ckpt), adapter_name=f"adapter_{i}")
            served = name or (args.served_model_name if len(specs) == 1 else None) or _served_name(ckpt)
            if served in models:
                raise UserError(f"--adapters: two adapters are both named {served!r}; name them with NAME=PATH.")
            models[served] = ServedModel(served, None if merge else ("default" if i == 0 else f"adapter_{i}"),
                                         system if system is not None else saved.system, str(ckpt))
        if not merge:
            models.setdefault(base_path.name, ServedModel(base_path.name, None, system, str(base_path)))
    for served in models.values():  # '<|im_start|>system\nX<|im_end|>' -> 'X', with a warning
        served.system = strip_system_markers(tokenizer, served.system)
    engine = Engine(model, tokenizer, max_batch_size=args.max_concurrency)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    return Served(model, tokenizer, engine, models, context)


class active_adapter:
    """Context: run the peft model with one adapter active, or with adapters off (base model)."""

    def __init__(self, model, adapter: str | None):
        self.model, self.adapter, self.ctx = model, adapter, None

    def __enter__(self):
        if not hasattr(self.model, "peft_config"):
            return
        if self.adapter is None:
            self.ctx = self.model.disable_adapter()
            self.ctx.__enter__()
        else:
            self.model.set_adapter(self.adapter)

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
