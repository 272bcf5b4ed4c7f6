"""Write a Hugging Face folder (a merged fine-tune) as one GGUF file for llama.cpp, Ollama and transformers.

Supports the llama and qwen2 architectures with byte-level BPE tokenizers (SmolLM2, Llama 3,
Qwen2.5). The layout follows llama.cpp's own converter (`convert_hf_to_gguf.py`):

- tensors get llama.cpp names (`blk.N.attn_q.weight`); llama's q/k rows are permuted into the
  interleaved rotary layout llama.cpp's llama graph expects (qwen2 uses the "neox" layout, which is
  the Hugging Face one, so its tensors are written as they are);
- 1-D tensors (norms, biases) stay float32; 2-D tensors become f16, bf16 or q8_0;
- the tokenizer travels as metadata: vocabulary in id order (padded with `[PADn]` up to the
  model's vocab size), token types, merges, special token ids, the pre-tokenizer name and the
  chat template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2

from lorakit.data.render import IGNORE_INDEX, render_conversation
from lorakit.errors import UserError

# --to_gguf value -> (tensor type of 2-D weights, llama.cpp file type id)
OUTTYPES = {
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
}
# config.json model_type -> llama.cpp architecture name
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# Hugging Face module path inside a decoder layer -> llama.cpp tensor name inside blk.N
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GgufSummary:
    """What `write_gguf` wrote."""

    path: Path
    architecture: str
    outtype: str
    tensor_count: int
    vocab_size: int
    pre_tokenizer: str
    file_bytes: int


def write_gguf(model_dir: Path | str, out_path: Path | str, *, outtype: str = "f16",
               name: str | None = None) -> GgufSummary:
    """Convert the Hugging Face model folder `model_dir` into the single GGUF file `out_path`."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_convertible(config, model_dir, outtype, model_dir)
    writer = gguf.GGUFWriter(str(out_path), arch, use_temp_file=True)
    add_model_metadata(writer, config, arch, outtype, name or model_dir.name)
    pre = add_tokenizer_metadata(writer, model_dir, int(config["vocab_size"]))
    count = 0
    for hf_name, tensor in iter_hf_tensors(model_dir):
        gguf_name = gguf_tensor_name(hf_name)
        if gguf_name is None:  # a tied lm_head saved anyway: llama.cpp reuses token_embd
            continue
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads"]
            kv_heads = config["num_key_value_heads"] if ".attn_k." in gguf_name else heads
            tensor = permute_for_llama_rope(tensor, kv_heads)
        data, qtype = encode_tensor(tensor, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        count += 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufSummary(out_path, arch, outtype, count, int(config["vocab_size"]), pre, out_path.stat().st_size)


def check_convertible(config: dict, config_dir: Path, outtype: str, tokenizer_dir: Path) -> str:
    """The llama.cpp architecture name, or a UserError saying why this model cannot become a GGUF file.

    Reads only config.json and the tokenizer files, so `lorakit export` checks --to_gguf before it merges.
    """
    if outtype not in OUTTYPES:
        raise UserError(f"--to_gguf {outtype!r} is not one of {', '.join(OUTTYPES)}.")
    arch = ARCHITECTURES.get(config.get("model_type"))
    if arch is None:
        raise UserError(f"--to_gguf: {config_dir}/config.json has model_type {config.get('model_type')!r}; the GGUF "
                        f"writer supports {', '.join(ARCHITECTURES)}. Use llama.cpp's convert_hf_to_gguf.py on the "
                        f"merged folder for other architectures.")
    _check_rope(config)
    spec = json.loads(AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str())
    _check_tokenizer_spec(spec, tokenizer_dir)
    pre_tokenizer_name(spec.get("pre_tokenizer"))
    return arch


def _check_rope(config: dict) -> dict:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise UserError(f"--to_gguf: rope scaling {rope_type!r} in config.json is not supported by lorakit's GGUF "
                        f"writer; use llama.cpp's convert_hf_to_gguf.py on the merged folder.")
    return rope


def _check_tokenizer_spec(spec: dict, model_dir: Path) -> None:
    if spec["model"]["type"] != "BPE" or not _is_byte_level(spec):
        raise UserError(f"--to_gguf: the tokenizer in {model_dir} is not a byte-level BPE tokenizer; lorakit's GGUF "
                        f"writer handles those (Qwen2, Llama 3, SmolLM2). Use llama.cpp's convert_hf_to_gguf.py.")


def add_model_metadata(writer, config: dict, arch: str, outtype: str, name: str) -> None:
    """Hyper-parameters under llama.cpp's key names; refuses settings llama.cpp would compute differently."""
    rope = _check_rope(config)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    if head_dim != int(config["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(2)


def add_tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> str:
    """Vocabulary, merges, special ids and chat template of the folder's tokenizer; returns the pre-tokenizer name."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    _check_tokenizer_spec(spec, model_dir)
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    tokens, types = token_table(spec, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    probe = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    eot = turn_end_id(tokenizer)
    if eot is not None:  # without it llama.cpp guesses its end-of-turn token by name (SmolLM2: <|endoftext|>)
        writer.add_eot_token_id(eot)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return pre


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template ends an assistant turn with (`<|im_end|>`), if it ends with one."""
    if not tokenizer.chat_template:
        return None
    rendered = render_conversation(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    learned = [t for t in rendered.labels if t != IGNORE_INDEX]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return learned[-1] if learned and learned[-1] in special else None


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE (it must split the same way)."""
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [s.get("type") for s in steps]
    if steps[-1].get("add_prefix_space"):
        raise UserError("--to_gguf: the tokenizer's pre-tokenizer adds a space before the text (add_prefix_space); "
                        "llama.cpp's BPE tokenizer never does, so it would tokenize prompts differently. Use "
                        "llama.cpp's convert_hf_to_gguf.py on the merged folder.")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for the GPT-2 regex; its "gpt2" is the tokenizer model, not a pre-tokenizer
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == QWEN2:
            return "qwen2"
        if regex == llama3:
            return "llama-bpe"
    raise UserError(f"--to_gguf: the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)[:200]} has no llama.cpp "
                    f"equivalent lorakit knows (gpt-2, smollm, qwen2, llama-bpe); llama.cpp would split text "
                    f"differently. Use llama.cpp's convert_hf_to_gguf.py on the merged folder.")


def token_table(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with llama.cpp token types; ids the tokenizer lacks become unused `[PADn]`."""
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for token, index in spec["model"]["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = token, NORMAL
    for added in spec.get("added_tokens", []):
        index = added["id"]
        if index >= vocab_size:
            raise UserError(f"--to_gguf: added token {added['content']!r} has id {index}, beyond the model's "
                            f"vocab_size {vocab_size} (config.json); resize the embeddings before exporting.")
        tokens[index] = added["content"]
        types[index] = CONTROL if added.get("special") else USER_DEFINED
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], types


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face tensor; None for a tied lm_head; an unknown tensor is an error."""
    match = LAYER_NAME.match(hf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    module, _, kind = hf_name.rpartition(".")
    if module in TOP_TENSORS and kind == "weight":
        return f"{TOP_TENSORS[module]}.weight"
    raise UserError(f"--to_gguf: tensor {hf_name} has no llama.cpp counterpart in the llama/qwen2 layout; "
                    f"the model is not a plain llama/qwen2 model. Use llama.cpp's convert_hf_to_gguf.py.")


def iter_hf_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every tensor of the folder's safetensors files, one at a time."""
    config = json.loads((model_dir / "config.json").read_text())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"--to_gguf: no *.safetensors files in {model_dir}.")
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                yield name, handle.get_tensor(name).float()


def permute_for_llama_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def encode_tensor(tensor: torch.Tensor, outtype: str):
    """(numpy data, GGML type): 1-D tensors stay f32; 2-D ones become the requested type (f16 if q8_0 can't fit)."""
    import gguf

    data = tensor.detach().cpu().float().numpy()
    if data.ndim <= 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    qtype = getattr(gguf.GGMLQuantizationType, OUTTYPES[outtype][0])
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 != 0:
        qtype = gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 wide; llama.cpp's converter does the same
    return gguf.quants.quantize(data, qtype), qtype
