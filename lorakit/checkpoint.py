"""Checkpoints as plain files: written atomically by `save_checkpoint`, read by `load_checkpoint`.

A checkpoint folder holds either a PEFT adapter (adapter_config.json + adapter_model.safetensors)
or full sharded safetensors weights, the tokenizer with its chat template, args.json (every
resolved argument) and, unless --save_only_model, the training state needed to resume exactly:
trainer_state.json (step, epoch, data order, losses), optimizer.pt and rng_state.pt.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from lorakit.args import QuantArgs
from lorakit.errors import UserError
from lorakit.model import load_model, load_tokenizer, resolve_model_path
from lorakit.quantize import base_note, checkpoint_quant

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG_STATE = "rng_state.pt"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Test hook: seconds to sleep after the files are written and before the rename, so a test can
# kill the process mid-save and check the previous checkpoint survives.
_SAVE_SLEEP_ENV = "LORAKIT_TEST_SAVE_SLEEP"


@dataclass
class TrainState:
    """Where training stands: enough, with the optimizer state, to continue exactly."""

    step: int
    epoch: float
    total_steps: int
    train_loss: float | None = None
    eval_loss: float | None = None
    data_order: dict[str, Any] = field(default_factory=dict)  # seed, n_train, batch sizes, steps/epoch
    log_history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None  # optimizer.state_dict(); saved to optimizer.pt
    rng: dict[str, Any] | None = None  # capture_rng(); saved to rng_state.pt


@dataclass
class Loaded:
    """A loaded checkpoint: model ready for inference, its tokenizer, its args.json, its folder."""

    model: Any
    tokenizer: Any
    args: dict[str, Any]
    path: Path


def capture_rng() -> dict[str, Any]:
    """Every RNG state dropout and shuffling draw from."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["numpy"] = np.random.get_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states from `capture_rng`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def save_checkpoint(
    dir: str | Path, *, model, tokenizer: PreTrainedTokenizerBase, args: dict[str, Any],
    train_state: TrainState | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint to `dir` atomically: a temporary folder beside it, fsync, rename.

    `state_dict`: the weights to write instead of the model's own (gathered from FSDP2 shards)."""
    final = Path(dir).resolve()
    if final.exists():
        return final
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB", state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _write_json(tmp / "args.json", args)
    if train_state is not None:
        meta = {k: v for k, v in asdict(train_state).items() if k not in ("optimizer", "rng")}
        _write_json(tmp / TRAINER_STATE, meta)
        if train_state.optimizer is not None:
            torch.save(train_state.optimizer, tmp / OPTIMIZER)
        if train_state.rng is not None:
            torch.save(train_state.rng, tmp / RNG_STATE)
    _fsync_tree(tmp)
    if os.environ.get(_SAVE_SLEEP_ENV):
        time.sleep(float(os.environ[_SAVE_SLEEP_ENV]))
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint-N folders of a run, oldest first (temporary folders are skipped)."""
    run = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    """A folder holding an adapter or full weights."""
    return (path / ADAPTER_CONFIG).is_file() or (
        (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    )


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path means: itself, a run folder's last checkpoint, or an output folder's newest run's."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"Checkpoint {p} does not exist. Give a checkpoint-N folder or a run folder from lorakit sft.")
    p = p.resolve()
    if is_checkpoint(p):
        return p
    if p.is_dir():
        checkpoints = list_checkpoints(p)
        if not checkpoints:  # an --output_dir: take its newest run that has a checkpoint
            runs = sorted((r for r in p.iterdir() if r.is_dir() and list_checkpoints(r)), key=lambda r: r.stat().st_mtime)
            checkpoints = list_checkpoints(runs[-1]) if runs else []
        for candidate in reversed(checkpoints):
            if is_checkpoint(candidate):
                return candidate
        listing = ", ".join(c.name for c in checkpoints) or "none"
        raise UserError(
            f"{p} is not a checkpoint: it has no {ADAPTER_CONFIG} (LoRA) or config.json + *.safetensors (full). "
            f"Checkpoints found inside: {listing}. Pass a checkpoint-N folder or the run folder of lorakit sft."
        )
    raise UserError(f"{p} is a file, not a checkpoint folder.")


def read_args(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's args.json, or {} for an adapter made elsewhere."""
    path = checkpoint / "args.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _base_model_path(checkpoint: Path, args: dict[str, Any]) -> str:
    base = args.get("model_path")
    if not base:
        config = json.loads((checkpoint / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{checkpoint}: neither args.json nor {ADAPTER_CONFIG} names the base model. Pass --model.")
    return base


def _has_tokenizer(checkpoint: Path) -> bool:
    return (checkpoint / "tokenizer_config.json").is_file()


def load_checkpoint(
    path: str | Path, *, model=None, torch_dtype: str = "auto", device=None, merge_lora: bool = False,
    quant: QuantArgs | None = None, full_precision: bool = False, attn_impl: str = "sdpa",
) -> Loaded:
    """Load a checkpoint (or a run folder's last) for inference; `model` reuses an already-loaded base.

    attn_impl: the attention implementation of the weights loaded here (--attn_impl).

    The base loads quantized as `quant` says, else as args.json records it was trained (QLoRA), unless
    `full_precision` or `merge_lora` (merging into 4-bit weights would round the merged weights again).
    """
    ckpt = find_checkpoint(path)
    args = read_args(ckpt)
    if not (ckpt / ADAPTER_CONFIG).is_file():  # full weights: quantized only when the flags ask
        full = load_model(ckpt, torch_dtype=torch_dtype, device=device, attn_impl=attn_impl,
                          quant=quant if quant and quant.enabled else None)
        return Loaded(model=full.eval(), tokenizer=load_tokenizer(ckpt), args=args, path=ckpt)
    from peft import PeftModel  # lazy: peft imports bitsandbytes, which warns on import

    base_path = None
    if model is None:
        base_path = resolve_model_path(_base_model_path(ckpt, args), use_hf=args.get("model", {}).get("use_hf", True))
        base_quant = checkpoint_quant(quant, args, full_precision=full_precision or merge_lora)
        model = load_model(base_path, torch_dtype=torch_dtype, device=device, quant=base_quant,
                           attn_impl=attn_impl)
        if base_quant is not None:
            print(base_note(ckpt.name, base_quant, from_flags=bool(quant and quant.enabled)), file=sys.stderr)
        elif merge_lora and checkpoint_quant(quant, args) is not None:
            print(f"note: {ckpt.name} was trained on a quantized base; merging loads the full-precision base "
                  f"(merged 4-bit weights would be rounded again).", file=sys.stderr)
    peft_model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=False)
    tokenizer = load_tokenizer(ckpt if _has_tokenizer(ckpt) else base_path or _base_model_path(ckpt, args))
    result = peft_model.merge_and_unload() if merge_lora else peft_model
    return Loaded(model=result.eval(), tokenizer=tokenizer, args=args, path=ckpt)


def load_train_state(checkpoint: str | Path) -> TrainState:
    """The training state saved beside the weights; an error if it was saved with --save_only_model."""
    ckpt = find_checkpoint(checkpoint)
    meta_path = ckpt / TRAINER_STATE
    if not meta_path.is_file() or not (ckpt / OPTIMIZER).is_file():
        raise UserError(
            f"{ckpt} has no {TRAINER_STATE}/{OPTIMIZER} (saved with --save_only_model, or not made by lorakit), "
            f"so it cannot be resumed exactly. Use --resume_only_model true to start a new run from its weights."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    state = TrainState(**meta)
    state.optimizer = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=False)
    if (ckpt / RNG_STATE).is_file():
        state.rng = torch.load(ckpt / RNG_STATE, map_location="cpu", weights_only=False)
    return state


def load_weights_into(model, checkpoint: str | Path) -> Path:
    """Copy a checkpoint's trainable weights (adapter or full) into an already-built `model`."""
    ckpt = find_checkpoint(checkpoint)
    if (ckpt / ADAPTER_CONFIG).is_file():
        from peft import set_peft_model_state_dict  # lazy: peft imports bitsandbytes, which warns on import

        if not hasattr(model, "peft_config"):
            raise UserError(f"{ckpt} holds a LoRA adapter; resume it with --train_type lora.")
        result = set_peft_model_state_dict(model, load_file(ckpt / ADAPTER_WEIGHTS))
        missing = [k for k in getattr(result, "unexpected_keys", [])]
        if missing:
            raise UserError(f"{ckpt}: adapter weights do not fit this model ({missing[0]} ...): check --lora_rank and --target_modules.")
        return ckpt
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(shard))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise UserError(f"{ckpt}: weights do not fit this model ({result.unexpected_keys[0]} ...).")
    return ckpt


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and the best by eval loss; return the deleted."""
    checkpoints = list_checkpoints(run_dir)
    keepers = set(checkpoints[-keep:]) if keep > 0 else set()
    best = best_checkpoint(run_dir)
    if best is not None:
        keepers.add(best)
    removed = [c for c in checkpoints if c not in keepers]
    for c in removed:
        shutil.rmtree(c)
    return removed


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the lowest eval loss recorded in its trainer_state.json, if any has one."""
    scored = []
    for c in list_checkpoints(run_dir):
        meta_path = c / TRAINER_STATE
        if meta_path.is_file():
            loss = json.loads(meta_path.read_text(encoding="utf-8")).get("eval_loss")
            if loss is not None:
                scored.append((loss, c))
    return min(scored, key=lambda x: x[0])[1] if scored else None
