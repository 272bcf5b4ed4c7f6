"""The fast GGUF -> Hugging Face conversion gives the folder transformers' own GGUF loaders give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorakit.model as model_mod
from lorakit import gguf_reader
from lorakit.model import convert_gguf, default_gguf_file, load_model, load_tokenizer

HARD_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing tabs\t\t\nand\r\nnewlines  ",
    "你好，世界！机器学习很有趣。",
    "def f(x):\n    return {'a': x ** 2, \"b\": [1, 2, 3]}  # comment",
    "3.14159 1234567890 0x1F 1e-5 -42",
    "emoji 🎉🤖👍🏽 and accents: café naïve Ærøskøbing",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 2 + 2? Answer with one digit."}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fast conversion of the real SmolLM2 GGUF into a fresh cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_mod, "CACHE_DIR", tmp_path_factory.mktemp("lorakit-cache"))
        patch.setattr(model_mod, "convert_gguf_transformers", lambda *a: pytest.fail("fell back to the slow path"))
        return convert_gguf(default_gguf_file())


@pytest.fixture(scope="module")
def reference():
    """transformers' GGUF loaders on the same file: config, tokenizer and float32 model (the slow path)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_file()
    folder, name = gguf.parent, gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return config, tokenizer, model


def test_the_fast_path_converts_without_falling_back(converted):
    source = json.loads((converted / "lorakit_source.json").read_text())
    assert source["gguf_file"] == str(default_gguf_file())
    assert not converted.with_name(converted.name + ".tmp").exists()
    assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"
    assert {p.name for p in converted.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def test_config_matches_transformers_gguf_config(converted, reference):
    from transformers import AutoConfig

    ours, theirs = AutoConfig.from_pretrained(converted), reference[0]
    fields = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.architectures == ["LlamaForCausalLM"]
    assert getattr(ours, "quantization_config", None) is None
    assert (ours.hidden_size, ours.num_hidden_layers, ours.tie_word_embeddings) == (576, 30, True)


def test_weights_are_bit_identical_to_transformers_gguf_load(converted, reference):
    ours = load_model(converted, torch_dtype="float32", device="cpu").state_dict()
    theirs = reference[2].state_dict()
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert different == []
    assert sum(t.numel() for k, t in ours.items() if k != "lm_head.weight") == 134_515_008


def test_tokenizer_matches_transformers_gguf_tokenizer(converted, reference):
    ours, theirs = load_tokenizer(converted), reference[1]
    for text in HARD_STRINGS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == theirs.decode(theirs(text).input_ids)
    assert ours.chat_template == theirs.chat_template
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert len(ours) == len(theirs) == 49152
    rendered = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours(rendered).input_ids == theirs(
        theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)).input_ids


def test_logits_of_the_saved_folder_equal_the_gguf_model(converted, reference):
    tokenizer = reference[1]
    prompt = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    ours = load_model(converted, torch_dtype="float32", device="cpu").eval()
    with torch.no_grad():
        mine, theirs = ours(ids).logits, reference[2](ids).logits
    assert torch.equal(mine, theirs)
    assert tokenizer.decode(mine[0, -1].argmax()) == tokenizer.decode(theirs[0, -1].argmax())


def test_a_second_call_returns_the_cached_folder_at_once(converted, monkeypatch):
    monkeypatch.setattr(model_mod, "CACHE_DIR", converted.parents[1])
    monkeypatch.setattr(model_mod, "convert_gguf_fast", lambda *a: pytest.fail("converted twice"))
    assert convert_gguf(default_gguf_file()) == converted


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"])
def test_torch_dequantisation_equals_gguf_py(type_name):
    from gguf import GGMLQuantizationType, quants

    ggml_type = GGMLQuantizationType[type_name]
    values = torch.randn(8, 96, generator=torch.Generator().manual_seed(0)).numpy() * 3
    raw = np.frombuffer(quants.quantize(values, ggml_type).tobytes(), np.uint8)
    tensor = gguf_reader.GgufTensor("t", (96, 8), int(ggml_type), 0)
    fast = gguf_reader.dequantize(raw.tobytes(), tensor)
    reference = gguf_reader.dequantize_reference(raw, ggml_type, (8, 96))
    assert fast.dtype == torch.float32 and fast.shape == (8, 96)
    assert torch.equal(fast, torch.from_numpy(reference))
    assert (fast - torch.from_numpy(values)).abs().max() < (1.0 if type_name.startswith("Q") else 0.05)


def test_real_tensors_dequantise_like_gguf_py(converted):
    gguf = gguf_reader.read_gguf(default_gguf_file())
    types = {}
    for tensor in gguf.tensors:
        types.setdefault(tensor.ggml_type, tensor)
    assert set(types) == {0, 3, 8}  # F32 norms, Q4_1 layers, Q8_0 embedding
    for tensor in types.values():
        shape = tuple(reversed(tensor.dims))
        raw = np.frombuffer(gguf.buffer, np.uint8, _byte_count(tensor), tensor.offset)
        assert torch.equal(gguf_reader.dequantize(gguf.buffer, tensor),
                           torch.from_numpy(gguf_reader.dequantize_reference(raw, tensor.ggml_type, shape)))


def _byte_count(tensor) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
    return int(np.prod(tensor.dims)) // block * block_bytes


def test_qwen2_gguf_round_trips_through_the_fast_path(tiny_qwen2_dir, tmp_path, monkeypatch):
    """A Qwen2 (q/k/v biases, untied lm_head) written by lorakit's GGUF writer comes back with its weights."""
    from safetensors.torch import load_file

    from lorakit.gguf_writer import write_gguf

    gguf_path = write_gguf(tiny_qwen2_dir, tmp_path / "tiny.gguf", outtype="f16").path
    monkeypatch.setattr(model_mod, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(model_mod, "convert_gguf_transformers", lambda *a: pytest.fail("fell back"))
    out = convert_gguf(gguf_path)
    config = json.loads((out / "config.json").read_text())
    original = json.loads((tiny_qwen2_dir / "config.json").read_text())
    for field in ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps"]:
        assert config[field] == pytest.approx(original[field]), field
    ours, theirs = load_file(out / "model.safetensors"), load_file(tiny_qwen2_dir / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        expected = tensor.half().float() if tensor.ndim == 2 else tensor
        assert torch.equal(ours[name], expected), name


def test_other_architectures_fall_back_to_transformers_with_a_note(tmp_path, monkeypatch, capsys):
    gguf = gguf_reader.GgufContents({"general.architecture": "gpt2"}, [], b"")
    with pytest.raises(gguf_reader.UnsupportedGguf, match="not gpt2"):
        gguf_reader.gguf_config_dict(gguf)

    def slow(gguf_path, tmp):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"")

    def unsupported(gguf_path, tmp):
        (tmp / "config.json").write_text("{")  # a partial folder the fallback must not trip over
        raise gguf_reader.UnsupportedGguf("the fast GGUF conversion handles llama, qwen2, not gpt2")

    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(model_mod, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(model_mod, "convert_gguf_fast", unsupported)
    monkeypatch.setattr(model_mod, "convert_gguf_transformers", slow)
    out = convert_gguf(fake)
    assert (out / "config.json").is_file() and not list(out.parent.glob("*.tmp*"))
    assert "not gpt2; converting with transformers' GGUF loader instead" in capsys.readouterr().err


def test_concurrent_conversions_keep_each_others_files(tmp_path, monkeypatch):
    """Two processes converting the same GGUF at once: neither deletes the other's work in progress, and
    the one that finishes second keeps the first one's folder (a process may be loading it already)."""
    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(model_mod, "CACHE_DIR", tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)

    def write(folder, marker):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"by": marker}))
        (folder / "model.safetensors").write_bytes(b"")

    out = model_mod.conversion_folder(fake)
    in_progress = models / f"{out.name}.tmp-other"
    write(in_progress, "in progress")

    def convert_while_another_finishes(gguf_path, tmp):
        assert sorted(models.iterdir()) == sorted([in_progress, tmp])  # the other one's folder is left alone
        write(tmp, "second")
        write(out, "first")  # the other process renames its finished folder into place now
        (out / "lorakit_source.json").write_text("{}")

    monkeypatch.setattr(model_mod, "convert_gguf_fast", convert_while_another_finishes)
    assert convert_gguf(fake) == out
    assert json.loads((out / "config.json").read_text()) == {"by": "first"}
    assert sorted(models.iterdir()) == sorted([out, in_progress])
    monkeypatch.setattr(model_mod, "convert_gguf_fast", lambda *a: pytest.fail("converted twice"))
    assert convert_gguf(fake) == out


def test_a_file_that_is_not_gguf_is_a_user_error(tmp_path, monkeypatch):
    from lorakit.errors import UserError

    monkeypatch.setattr(model_mod, "CACHE_DIR", tmp_path / "cache")

    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(UserError, match="not a GGUF v2/v3 file"):
        gguf_reader.read_gguf(fake)
    fake.write_bytes(b"")
    with pytest.raises(UserError, match="0 bytes"):
        convert_gguf(fake)
