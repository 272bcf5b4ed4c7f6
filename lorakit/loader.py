"""Open a base model or a checkpoint for inference: the one way every command does it.

`open_model(model_args, adapters, system=...)` returns a `LoadedModel`: the model, its tokenizer with
the chat template training used (restored from args.json when the checkpoint's tokenizer lacks one),
the system prompt (--system as text or a .txt file, else the checkpoint's, else the template's
default), the checkpoint's saved arguments as a typed `SavedArgs`, and the adapter checked against
--model before any weight loads. infer, deploy, eval, export, vllm and quickstart all call it, so one
checkpoint gives every command the same model, template and system prompt.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorakit.args import BaseQuantArgs, DataArgs, FastOptions, LoraArgs, ModelArgs, QuantArgs, SftArgs, TrainArgs
from lorakit.checkpoint import ADAPTER_CONFIG, find_checkpoint, list_checkpoints, load_checkpoint, read_args
from lorakit.data.loading import resolve_system
from lorakit.data.render import set_chat_template, strip_system_markers
from lorakit.errors import UserError
from lorakit.model import load_model, load_tokenizer, pick_device, resolve_model_path
from lorakit.quantize import base_note, checkpoint_quant, quant_from_saved

__all__ = ["LoadedModel", "SavedArgs", "base_is_quantized", "check_adapter_fits", "find_adapter", "open_model", "open_tokenizer",
           "resolve_system", "saved_args"]

ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size")


# ---------------------------------------------------------------- args.json, typed


def _group(cls, values: dict[str, Any] | None):
    """A flag group rebuilt from its saved dict; keys this version does not know are left out."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in names})


@dataclass
class SavedArgs:
    """A checkpoint's args.json: the flags its training ran with and what they resolved to."""

    path: Path | None = None
    "The args.json this was read from (None: the checkpoint has none)."
    model_path: str | None = None
    "The base model folder training loaded (absolute)."
    template: str | None = None
    "--template training used ('tokenizer': the tokenizer's own)."
    chat_template: str | None = None
    "The chat template text training rendered with."
    system: str | None = None
    "The system prompt training resolved (None: the template's default)."
    model_name: list[str] = field(default_factory=list)
    model_author: list[str] = field(default_factory=list)
    train_type: str | None = None
    torch_dtype: str | None = None
    sft: SftArgs | None = None
    "The flag groups as saved (None when args.json has none, e.g. a checkpoint from another tool)."
    quant: QuantArgs | None = None
    "The quantization of the base training ran on (None: a full-precision base)."

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> SavedArgs:
        """Read the dict args.json holds (older files kept the identity under 'data' only)."""
        data = d.get("data") or {}
        sft = None
        if any(k in d for k in ("model", "data", "lora", "train")):
            try:
                sft = SftArgs(model=_group(ModelArgs, d.get("model")), data=_group(DataArgs, d.get("data")),
                              lora=_group(LoraArgs, d.get("lora")), train=_group(TrainArgs, d.get("train")),
                              fast=_group(FastOptions, d.get("fast")))
            except (TypeError, UserError) as exc:
                raise UserError(f"{path or 'args.json'}: the saved flags do not read back ({exc}); was it edited "
                                f"by hand?") from exc
        return cls(path=path, model_path=d.get("model_path"), template=d.get("template"),
                   chat_template=d.get("chat_template"), system=d.get("system"),
                   model_name=list(d.get("model_name") or data.get("model_name") or []),
                   model_author=list(d.get("model_author") or data.get("model_author") or []),
                   train_type=d.get("train_type"), torch_dtype=d.get("torch_dtype"), sft=sft,
                   quant=quant_from_saved(d))

    @property
    def use_hf(self) -> bool:
        """Whether the base came from the Hugging Face hub (True) or ModelScope."""
        return self.sft.model.use_hf if self.sft else True


def saved_args(checkpoint: str | Path) -> SavedArgs:
    """The SavedArgs of a checkpoint (or a run folder's last checkpoint); empty when it has no args.json."""
    ckpt = find_checkpoint(checkpoint)
    path = ckpt / "args.json"
    return SavedArgs.from_dict(read_args(ckpt), path if path.is_file() else None)


# ---------------------------------------------------------------- finding and checking a checkpoint


def find_adapter(spec: str) -> Path:
    """The checkpoint --adapters means; when there is none, say which folder lacks what and list
    the checkpoints that do exist beside it."""
    try:
        return find_checkpoint(spec)
    except UserError:
        path = Path(spec).expanduser().resolve()
        if not path.is_dir():
            raise
        if path.name.startswith("checkpoint-") and path.name[len("checkpoint-"):].isdigit():
            others = ", ".join(p.name for p in list_checkpoints(path.parent)) or "none"
            raise UserError(f"--adapters {spec}: {path} has no adapter_config.json (a LoRA adapter) and no "
                            f"config.json + *.safetensors (full weights). Checkpoints in {path.parent}: {others}. "
                            "Pass one of them, or the run folder for its last checkpoint.") from None
        if not list_checkpoints(path) and not (path / ADAPTER_CONFIG).exists():
            raise UserError(f"--adapters {spec}: {path} has no checkpoint: no adapter_config.json and no "
                            "checkpoint-N folder inside. A run writes one every --save_steps and at its end; "
                            "pass a run folder that finished, or a checkpoint-N folder.") from None
        raise


def trained_on(checkpoint: Path) -> str | None:
    """The base model a checkpoint was trained on: args.json's model_path, else adapter_config.json's."""
    base = saved_args(checkpoint).model_path
    adapter_config = checkpoint / ADAPTER_CONFIG
    if not base and adapter_config.is_file():
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    return base


def check_adapter_fits(checkpoint: Path, base_path: Path) -> None:
    """An adapter on another architecture or size is an error (not garbage output): compare the
    config of the base it was trained on (from args.json / adapter_config.json) with --model's."""
    base = trained_on(checkpoint)
    if not base or not (Path(base) / "config.json").is_file() or not (base_path / "config.json").is_file():
        return  # nothing to compare here; a mismatch still fails when the weights load
    want = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    have = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    differ = [f"{k} {want.get(k)} vs {have.get(k)}" for k in ARCHITECTURE_KEYS if want.get(k) != have.get(k)]
    if differ:
        raise UserError(f"The adapter {checkpoint} was trained on {base}, which differs from --model "
                        f"{base_path} ({'; '.join(differ)}). Use the base model it was trained on, or drop "
                        "--model to take it from the checkpoint's args.json.")


# ---------------------------------------------------------------- opening


@dataclass
class LoadedModel:
    """A model ready for inference, with everything that decides how it is prompted."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    system: str | None
    "--system (text or file), else the checkpoint's, else None (the template's default)."
    saved: SavedArgs | None
    "The checkpoint's args.json (None for a base model)."
    checkpoint: Path | None
    base_path: Path | None
    "The base model folder (None for a full fine-tuned checkpoint, which is its own base)."
    label: str
    "How to name it to a user: the base folder's name, or run/checkpoint-N."
    notes: list[str] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        """A LoRA adapter over its base (the base stays reachable through disable_adapter)."""
        return hasattr(self.model, "disable_adapter")


def restore_template(tokenizer: PreTrainedTokenizerBase, model_args: ModelArgs, saved: SavedArgs | None) -> None:
    """--template when given; else the chat template the checkpoint was trained with, if its tokenizer lost it."""
    if model_args.template:
        set_chat_template(tokenizer, model_args.template)
    elif saved and saved.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = saved.chat_template


def _one_checkpoint(adapters: list[str], command: str) -> str | None:
    if len(adapters) > 1:
        raise UserError(f"--adapters: {command} takes one checkpoint, got {len(adapters)}: {' '.join(adapters)}.")
    return adapters[0] if adapters else None


def base_is_quantized(adapters: list[str], base_quant: BaseQuantArgs | None) -> bool:
    """Whether open_model will load the base quantized: --quant_bits, else a QLoRA checkpoint's args.json
    (unless --full_precision_base). infer merges an adapter for the fast GPU decoder only over a plain base."""
    flags = base_quant or BaseQuantArgs()
    if flags.quant.enabled or not adapters:
        return flags.quant.enabled
    saved = read_args(find_adapter(adapters[0]))
    return checkpoint_quant(flags.quant, saved, full_precision=flags.full_precision_base) is not None


def _open_base(model_args: ModelArgs, system: str | None, *, dtype: str, device: torch.device, merge_lora: bool,
               base_quant: BaseQuantArgs) -> LoadedModel:
    """--model alone (no checkpoint), quantized when --quant_bits asks."""
    m = model_args
    path = resolve_model_path(m.model, use_hf=m.use_hf, gguf_file=m.gguf_file)
    tokenizer = load_tokenizer(path)
    set_chat_template(tokenizer, m.template)
    quant = base_quant.quant if base_quant.quant.enabled else None
    model = load_model(path, torch_dtype=dtype, device=device, attn_impl=m.attn_impl, quant=quant).eval()
    notes = ["--merge_lora has no effect without --adapters."] if merge_lora else []
    if base_quant.full_precision_base:
        notes.append("--full_precision_base has no effect without --adapters: --model loads in full precision "
                     "unless --quant_bits is given.")
    return LoadedModel(model, tokenizer, strip_system_markers(tokenizer, system), None, None, path, path.name, notes)


def open_model(model_args: ModelArgs, adapters: list[str] | None = None, *, system: str | None = None,
               merge_lora: bool = False, torch_dtype: str | None = None, device: str | torch.device | None = None,
               full_precision: bool = False, base_quant: BaseQuantArgs | None = None,
               command: str = "this command") -> LoadedModel:
    """The base model (--model) or a checkpoint (--adapters, over --model when given) ready for inference.

    torch_dtype/device override --torch_dtype/--device (export merges in float32). merge_lora merges
    the adapter into the weights in memory (the files are untouched). base_quant: --quant_bits and
    --full_precision_base; without them a QLoRA checkpoint's base loads quantized as its args.json records,
    whether it comes from args.json or --model. full_precision: the base loads unquantized (export merges into it).
    """
    m = model_args
    dtype = torch_dtype or m.torch_dtype
    device = device if isinstance(device, torch.device) else pick_device(device or m.device)
    prompt = resolve_system(system)
    base_quant = base_quant or BaseQuantArgs()
    spec = _one_checkpoint(list(adapters or []), command)
    if spec is None:
        return _open_base(m, prompt, dtype=dtype, device=device, merge_lora=merge_lora, base_quant=base_quant)
    if merge_lora and base_quant.quant.enabled:
        raise UserError(f"--merge_lora true with --quant_bits {base_quant.quant.quant_bits}: an adapter merges into the "
                        f"full-precision base (merged 4/8-bit weights would be rounded again). Drop --quant_bits to "
                        f"merge, or drop --merge_lora to answer from the quantized base.")
    ckpt = find_adapter(spec)
    saved = saved_args(ckpt)
    full_precision = full_precision or base_quant.full_precision_base
    base, base_path = None, None
    if m.model:
        base_path = resolve_model_path(m.model, use_hf=m.use_hf, gguf_file=m.gguf_file)
        check_adapter_fits(ckpt, base_path)
        quant = checkpoint_quant(base_quant.quant, read_args(ckpt), full_precision=full_precision or merge_lora)
        base = load_model(base_path, torch_dtype=dtype, device=device, attn_impl=m.attn_impl, quant=quant)
        if quant is not None:
            print(base_note(ckpt.name, quant, from_flags=base_quant.quant.enabled), file=sys.stderr)
    try:
        loaded = load_checkpoint(ckpt, model=base, torch_dtype=dtype, device=device, merge_lora=merge_lora,
                                 quant=base_quant.quant, full_precision=full_precision, attn_impl=m.attn_impl)
    except (RuntimeError, ValueError) as exc:
        if base is None:
            raise
        raise UserError(f"The adapter {ckpt} does not fit --model {m.model}: {str(exc).splitlines()[0]} "
                        "Use the base model it was trained on (drop --model to take it from args.json).") from exc
    restore_template(loaded.tokenizer, m, saved)
    trained = saved.quant
    if base_quant.full_precision_base and trained is not None:
        print(f"note: the base of {ckpt.name} loads in full precision (--full_precision_base true); it was trained "
              f"{trained.quant_bits}-bit, so answers differ from training's by the quantization error.", file=sys.stderr)
    if base_path is None and (ckpt / ADAPTER_CONFIG).is_file():
        base_path = Path(trained_on(ckpt) or "")
    system_text = strip_system_markers(loaded.tokenizer, prompt if prompt is not None else saved.system)
    return LoadedModel(loaded.model, loaded.tokenizer, system_text, saved, ckpt, base_path,
                       f"{ckpt.parent.name}/{ckpt.name}")


@dataclass
class OpenedTokenizer:
    """What prompting a checkpoint needs without its weights (the vLLM backend loads those itself)."""

    tokenizer: PreTrainedTokenizerBase
    system: str | None
    saved: SavedArgs | None
    checkpoint: Path | None
    base_path: Path


def open_tokenizer(model_args: ModelArgs, adapters: list[str] | None = None, *,
                   system: str | None = None, command: str = "this command") -> OpenedTokenizer:
    """The tokenizer, template and system prompt open_model would give, without loading any weights."""
    m = model_args
    prompt = resolve_system(system)
    spec = _one_checkpoint(list(adapters or []), command)
    ckpt = find_adapter(spec) if spec else None
    saved = saved_args(ckpt) if ckpt else None
    base_path = resolve_model_path(m.model or (trained_on(ckpt) if ckpt else None), use_hf=m.use_hf,
                                   gguf_file=m.gguf_file)
    if ckpt and m.model:
        check_adapter_fits(ckpt, base_path)
    tokenizer = load_tokenizer(ckpt if ckpt and (ckpt / "tokenizer_config.json").is_file() else base_path)
    if ckpt:
        restore_template(tokenizer, m, saved)
    else:
        set_chat_template(tokenizer, m.template)
    system_text = strip_system_markers(tokenizer, prompt if prompt is not None else (saved.system if saved else None))
    return OpenedTokenizer(tokenizer, system_text, saved, ckpt, base_path)
