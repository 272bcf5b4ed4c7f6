"""Read a GGUF file into a Hugging Face model folder: a small reader of our own (one pass over the
memory-mapped file) plus transformers' GGUF tables, with transformers' own GGUF loaders as the
reference path. `gguf_writer.py` is the other direction. `model.convert_gguf` caches the result."""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map
from gguf import dequantize as gguf_dequantize
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from lorakit.errors import UserError


def gguf_cache_name(gguf_path: Path) -> str:
    """A cache folder name for what is derived from this GGUF file: its stem and a key of its path, size and time."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf_path.stem}-{key}"


def convert_gguf_transformers(gguf_path: Path, tmp: Path) -> None:
    """The reference conversion: transformers' GGUF loaders, which parse the whole file three times (~40 s)."""
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


class UnsupportedGguf(Exception):
    """A GGUF the fast conversion does not handle (architecture, value or tensor type): use the slow path."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry in the GGUF tensor table."""

    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension first (the reverse of torch's shape)
    ggml_type: int
    offset: int  # from the start of the file


@dataclass(frozen=True)
class GgufContents:
    """A GGUF file's metadata (key -> Python value) and tensor table over its memory-mapped bytes."""

    metadata: dict
    tensors: list[GgufTensor]
    buffer: mmap.mmap


def read_gguf(path: Path) -> GgufContents:
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
        key, pos = _read_string(buf, pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, value_type)
    table = []
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        table.append((name, dims, ggml_type, offset))
        pos += 4 + 8 * n_dims + 12
    alignment = metadata.get("general.alignment", 32)
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = [GgufTensor(name, dims, ggml_type, data_start + offset) for name, dims, ggml_type, offset in table]
    return GgufContents(metadata, tensors, buf)


def _read_string(buf, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + length].decode(), pos + 8 + length


def _read_value(buf, pos: int, value_type: int):
    """One metadata value at pos and the position after it; arrays become lists (one-element ones scalars,
    as transformers reads them)."""
    if value_type == _GGUF_STRING:
        return _read_string(buf, pos)
    if value_type != _GGUF_ARRAY:
        if value_type not in _GGUF_SCALAR_FORMATS:
            raise UnsupportedGguf(f"metadata value type {value_type} is unknown")
        fmt = _GGUF_SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type == _GGUF_STRING:
        items = []
        for _ in range(count):
            item, pos = _read_string(buf, pos)
            items.append(item)
    elif item_type in _GGUF_ARRAY_DTYPES:
        array = np.frombuffer(buf, _GGUF_ARRAY_DTYPES[item_type], count, pos)
        items, pos = array.tolist(), pos + array.nbytes
    else:
        raise UnsupportedGguf(f"metadata arrays of value type {item_type} are not handled")
    return (items[0] if len(items) == 1 else items), pos


def gguf_config_dict(gguf: GgufContents) -> dict:
    """The config dict transformers' load_gguf_checkpoint derives for a plain decoder (llama, qwen2)."""
    metadata = gguf.metadata
    arch = metadata.get("general.architecture")
    if arch not in FAST_GGUF_ARCHS or metadata.get("general.name") == "mistral":
        raise UnsupportedGguf(f"the fast GGUF conversion handles {', '.join(FAST_GGUF_ARCHS)}, not {arch}")
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


def gguf_state_dict(gguf: GgufContents, config: dict, hf_names: list[str]) -> dict[str, torch.Tensor]:
    """De-quantised float32 tensors under their Hugging Face names (gguf-py's name map, transformers' processor)."""
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
            weights = dequantize(gguf.buffer, tensor).numpy()
            result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=to_hf,
                                       parsed_parameters={"config": config, "tensors": state})
            if result.name in to_hf:
                state[to_hf[result.name]] = torch.from_numpy(np.ascontiguousarray(result.weights))
    finally:
        torch.set_num_threads(threads)
    return state


def dequantize(buffer, tensor: GgufTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's shape: float and Q4_0/Q4_1/Q8_0 types in torch (2x gguf-py's numpy
    on one thread), the others through gguf-py."""
    try:
        ggml_type = GGMLQuantizationType(tensor.ggml_type)
    except ValueError:
        raise UnsupportedGguf(f"tensor {tensor.name} has an unknown GGML type {tensor.ggml_type}") from None
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    shape = tuple(reversed(tensor.dims))
    n_bytes = math.prod(shape) // block * block_bytes
    raw = np.frombuffer(buffer, np.uint8, n_bytes, tensor.offset)
    if ggml_type in _TORCH_DEQUANT:
        blocks = torch.from_numpy(raw.copy()).view(-1, block_bytes)
        return _TORCH_DEQUANT[ggml_type](blocks).reshape(shape)
    return torch.from_numpy(dequantize_reference(raw, ggml_type, shape))


def dequantize_reference(raw: np.ndarray, ggml_type, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's numpy de-quantisation (what transformers uses), as a float32 array of torch's shape."""
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    rows = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
    return np.array(gguf_dequantize(rows, ggml_type), dtype=np.float32).reshape(shape)


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


def convert_gguf_fast(gguf_path: Path, tmp: Path) -> None:
    """Parse the GGUF once and save config, float32 weights and tokenizer; raises UnsupportedGguf to fall back."""
    gguf = read_gguf(gguf_path)
    config_dict = gguf_config_dict(gguf)
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_state_dict(gguf, config_dict, list(model.state_dict()))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UnsupportedGguf(f"{gguf_path.name} has no tensor for {', '.join(missing[:5])}")
    model.save_pretrained(tmp)
    # transformers' GGUF tokenizer reads just the vocabulary and special tokens (under a second).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(tmp)
