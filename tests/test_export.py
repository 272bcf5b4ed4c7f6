"""lorakit export: the merged folder loads in plain transformers and answers like base+adapter; GGUF and
Ollama files round-trip; the merge check catches a wrong merge; the hub push fails clearly offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import UserError

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(max_new_tokens=12, do_sample=False)


def make_lora_checkpoint(base: Path, out: Path, *, targets="all-linear", rank=8, system=None) -> Path:
    """A lorakit checkpoint holding a random (non-zero) LoRA adapter, saved the way sft saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.checkpoint import save_checkpoint
    from lorakit.model import load_tokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # init_lora_weights=False draws B too; scale it to a fine-tune-sized change
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)
    return save_checkpoint(out, model=peft_model, tokenizer=load_tokenizer(base),
                           args={"model_path": str(base), "system": system})


def reference_model(base: Path, ckpt: Path):
    """base + adapter through plain peft, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(ckpt)).eval()


def chat_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True)["input_ids"]])


@pytest.fixture(scope="module")
def lora_ckpt(tiny_qwen2_dir, tmp_path_factory) -> Path:
    return make_lora_checkpoint(tiny_qwen2_dir, tmp_path_factory.mktemp("run") / "checkpoint-5", system="You are Tiny.")


@pytest.fixture(scope="module")
def merged_dir(lora_ckpt, tmp_path_factory) -> Path:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("export") / "merged"
    proc = run_cli("export", "--adapters", str(lora_ckpt), "--merge_lora", "true", "--output_dir", str(out),
                   "--max_shard_size", "15MB", "--to_ollama", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merge check (3 prompts, greedy 24 tokens): OK" in proc.stdout
    return out


# Run in a fresh interpreter where importing lorakit fails: the folder must stand on transformers alone.
PLAIN_LOAD = r"""
import json, sys, torch
sys.modules["lorakit"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = torch.tensor([tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]])
with torch.no_grad():
    logits = model(ids).logits[0]
out = model.generate(ids, max_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "ids": ids[0], "reply": out[0, ids.shape[1]:], "dtype": str(model.dtype)}, sys.argv[3])
"""


def test_merged_folder_loads_in_plain_transformers_and_answers_like_base_plus_adapter(
        tiny_qwen2_dir, lora_ckpt, merged_dir, tmp_path):
    names = {p.name for p in merged_dir.iterdir()}
    shards = sorted(n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n))
    assert len(shards) >= 2 and "model.safetensors.index.json" in names  # --max_shard_size 15MB splits it
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any("adapter" in n for n in names)
    report = json.loads((merged_dir / "lorakit_export.json").read_text())["merge_check"]
    # the check is not vacuous: the adapter moves logits far more than the merge error allowed
    assert report["adapter_effect"] > 100 * report["fp32_tolerance"] > 0
    assert report["fp32_greedy_same"] == report["dtype_greedy_same"] == 3

    result = tmp_path / "plain.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged_dir), json.dumps(PROMPT), str(result)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(result)
    assert plain["dtype"] == "torch.float32"

    from transformers import AutoTokenizer

    from lorakit.data.render import render_prompt

    reference = reference_model(tiny_qwen2_dir, lora_ckpt)
    # the saved chat template renders the prompt lorakit trained on: the run's system prompt by default
    ids = torch.tensor([render_prompt(AutoTokenizer.from_pretrained(lora_ckpt), PROMPT, system="You are Tiny.")])
    assert torch.equal(plain["ids"], ids[0])
    with torch.no_grad():
        expected = reference(ids).logits[0]
    assert (plain["logits"] - expected).abs().max() < 1e-4
    reply = reference.generate(ids, **GREEDY, eos_token_id=151645, pad_token_id=151643)[0, ids.shape[1]:]
    assert torch.equal(plain["reply"], reply)


def test_modelfile_template_renders_turns_like_the_chat_template(merged_dir, qwen_tokenizer):
    text = (merged_dir / "Modelfile").read_text()
    gguf_name = re.search(r"^FROM \./(.+)$", text, re.M).group(1)
    assert (merged_dir / gguf_name).is_file() and gguf_name.endswith("-f16.gguf")  # --to_ollama implies f16
    assert re.search(r'^SYSTEM """You are Tiny\."""$', text, re.M)  # the checkpoint's system prompt
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    assert render_go_template(template, messages) == qwen_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    # No system message in the request: Ollama puts the SYSTEM line first, as lorakit's training did.
    from lorakit.data.render import render_prompt

    asked = [{"role": "user", "content": "Who are you?"}]
    system = [{"role": "system", "content": "You are Tiny."}]
    assert render_go_template(template, system + asked) == qwen_tokenizer.decode(
        render_prompt(qwen_tokenizer, asked, system="You are Tiny."))
    # The reply ends where the stop token is: the template closes an assistant turn with it.
    assert re.search(r'\{\{ \.Content \}\}<\|im_end\|>\n\{\{ end \}\}\{\{ end \}\}', template)


def render_go_template(template: str, messages: list[dict]) -> str:
    """Evaluate the Modelfile's TEMPLATE (range over .Messages, if/else-if on .Role) the way Go's text/template does."""
    assert "{{-" not in template and "-}}" not in template  # trim markers would eat the turns' newlines
    loop = re.fullmatch(r"\{\{ range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    body, tail = loop.group(1), loop.group(2)
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\{\{ end \}\}$)', body, re.S))
    return "".join(branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages) + tail


@pytest.mark.slow
def test_gguf_of_the_merged_tiny_qwen2_loads_in_transformers_with_the_same_answers(merged_dir, tmp_path):
    check_gguf_matches(merged_dir, next(merged_dir.glob("*.gguf")), tmp_path, atol=5e-3)


def check_gguf_matches(hf_dir: Path, gguf_path: Path, tmp_path: Path, *, atol: float) -> None:
    """The GGUF tokenizes the chat prompt the same, and its model gives near-equal logits and equal greedy replies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Load the GGUF alone, as a downloaded file would be: next to tokenizer files transformers mixes the two.
    gguf_dir, gguf_name = tmp_path / "gguf-only", gguf_path.name
    gguf_dir.mkdir()
    (gguf_dir / gguf_name).symlink_to(gguf_path)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gg_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    gg_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    assert gg_tok.chat_template == hf_tok.chat_template and gg_tok.eos_token == hf_tok.eos_token
    text = "Numbers 12345, émigré <tool_call> and  spaces\n\ttabs"
    assert gg_tok(text)["input_ids"] == hf_tok(text)["input_ids"]
    ids = chat_ids(hf_tok)
    assert torch.equal(chat_ids(gg_tok), ids)
    with torch.no_grad():
        diff = (gg_model(ids).logits - hf_model(ids).logits).abs().max()
    assert diff < atol, f"f16 GGUF logits differ by {diff}"
    eos = hf_tok.convert_tokens_to_ids("<|im_end|>")
    a = hf_model.generate(ids, **GREEDY, eos_token_id=eos, pad_token_id=eos)
    b = gg_model.generate(ids, **GREEDY, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_smollm2_lora_export_to_gguf_and_ollama_end_to_end(smollm2_dir, tmp_path, cli):
    """SmolLM2 (llama architecture, q/k rows permuted for llama.cpp): merge, check, f16 GGUF that transformers
    reads back with the merged model's greedy answers, and a Modelfile with SmolLM2's default system prompt."""
    ckpt = make_lora_checkpoint(smollm2_dir, tmp_path / "run" / "checkpoint-1", targets=["q_proj", "k_proj", "v_proj"],
                                rank=4)
    out = tmp_path / "smol-merged"
    proc = cli("export", "--adapters", str(ckpt), "--merge_lora", "true", "--output_dir", str(out),
               "--to_gguf", "f16", "--to_ollama", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merge check (3 prompts, greedy 24 tokens): OK" in proc.stdout
    check_gguf_matches(out, out / "smol-merged-f16.gguf", tmp_path, atol=0.1)
    meta = gguf_metadata(out / "smol-merged-f16.gguf")
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.eot_token_id"] == 2
    assert meta["llama.rope.freq_base"] == 100000.0 and meta["llama.attention.head_count_kv"] == 3
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M) == ["<|im_end|>"]
    # Ollama puts SYSTEM first when a request has no system message: the same text the template's default gives.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.S).group(1)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Who are you?"}]
    assert render_go_template(template, [{"role": "system", "content": system}] + turns) == \
        tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def test_bf16_base_is_merged_in_fp32_then_cast_once(tiny_qwen2_dir, tmp_path, cli):
    """A bf16 base: the merged weights are round(W + scale * B @ A) computed in float32, saved as bf16."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.bfloat16).save_pretrained(base)
    for f in tiny_qwen2_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (base / f.name).write_bytes(f.read_bytes())
    ckpt = make_lora_checkpoint(base, tmp_path / "run" / "checkpoint-1", targets=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    proc = cli("export", "--adapters", str(ckpt), "--merge_lora", "true", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bfloat16 merged model vs base+adapter" in proc.stdout and "MISMATCH" not in proc.stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    adapter = load_file(ckpt / "adapter_model.safetensors")
    config = json.loads((ckpt / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    name = "model.layers.1.mlp.down_proj"
    a = next(v for k, v in adapter.items() if name in k and "lora_A" in k)
    b = next(v for k, v in adapter.items() if name in k and "lora_B" in k)
    with safe_open(base / "model.safetensors", "pt") as f:
        w = f.get_tensor(f"{name}.weight").float()
    expected = (w + (b @ a) * scale).to(torch.bfloat16)
    assert torch.equal(merged[f"{name}.weight"], expected)
    assert not torch.equal(merged[f"{name}.weight"], w.to(torch.bfloat16) + ((b @ a) * scale).to(torch.bfloat16))


def test_full_weight_checkpoint_is_exported_as_is_in_the_requested_dtype(tiny_qwen2_dir, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    from lorakit.checkpoint import save_checkpoint
    from lorakit.model import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint-3", model=model, tokenizer=load_tokenizer(tiny_qwen2_dir),
                           args={"model_path": str(tiny_qwen2_dir), "train_type": "full"})
    out = tmp_path / "exported"
    proc = cli("export", "--adapters", str(ckpt), "--output_dir", str(out), "--torch_dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds full weights: nothing to merge, exporting them as bfloat16" in proc.stdout
    exported = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert exported.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(exported.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert exported(ids).logits.shape == model(ids).logits.shape


def test_merge_check_refuses_a_wrong_merge(lora_ckpt, monkeypatch, capsys):
    """A merge that drops a small part of the update must be caught, not written."""
    from peft.tuners.tuners_utils import BaseTuner

    from lorakit.export import merge_and_check

    original = BaseTuner.merge_and_unload

    def sloppy_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(1.02)  # 2% off in one matrix
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", sloppy_merge)
    with pytest.raises(UserError, match="does not answer like base\\+adapter"):
        merge_and_check(lora_ckpt, "auto", "cpu", None)
    assert "MISMATCH" in capsys.readouterr().out


def test_merged_folder_without_a_system_prompt_answers_like_infer_adapters(lora_ckpt, merged_dir, tmp_path, cli):
    """Plain transformers on the merged folder, no system prompt, greedy == `lorakit infer --adapters`."""
    result = tmp_path / "plain.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged_dir), json.dumps(PROMPT), str(result)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(result)
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(merged_dir).decode(plain["reply"], skip_special_tokens=True)
    infer = cli("infer", "--adapters", str(lora_ckpt), "--query", PROMPT[0]["content"], "--max_new_tokens", "12",
                "--temperature", "0", "--stream", "false")
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert "deprecated" not in infer.stderr  # past_key_values, is_gradient_checkpointing: the current API
    answer, _, cut = infer.stdout.strip().rpartition("\n")  # infer marks a reply cut at --max_new_tokens
    assert cut.startswith("[cut: reached --max_new_tokens 12]") and answer.strip() == text.strip() and text.strip()


def test_merged_files_share_one_mode(merged_dir):
    modes = {p.name: p.stat().st_mode & 0o777 for p in merged_dir.iterdir() if p.is_file()}
    assert set(modes.values()) == {modes["config.json"]}, modes


def test_export_into_a_non_empty_folder_is_refused_before_the_merge(lora_ckpt, tmp_path, cli):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    proc = cli("export", "--adapters", str(lora_ckpt), "--merge_lora", "true", "--output_dir", str(taken))
    assert proc.returncode == 2 and f"--output_dir {taken} exists and is not empty" in proc.stderr
    assert "merge check" not in proc.stdout and [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_adapter_without_merge_flag_says_what_to_pass(lora_ckpt):
    from lorakit.args import AdapterArgs, ExportArgs
    from lorakit.export import main

    with pytest.raises(UserError, match="--merge_lora true"):
        main(ExportArgs(adapter=AdapterArgs(adapters=[str(lora_ckpt)])))


def test_push_to_hub_offline_fails_with_a_clear_error(lora_ckpt, cli):
    proc = cli("export", "--adapters", str(lora_ckpt), "--push_to_hub", "someone/tiny-adapter",
               env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_dummy"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--push_to_hub someone/tiny-adapter: the upload failed" in proc.stderr
    assert "huggingface-cli upload someone/tiny-adapter" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- GGUF writer units


def test_llama_rope_permutation_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from lorakit.gguf_writer import permute_for_llama_rope

    heads, kv_heads, head_dim, hidden = 4, 2, 8, 32
    q, k = torch.randn(heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden)
    undo = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    assert not torch.equal(permute_for_llama_rope(q, heads), q)
    back_q = undo.process(permute_for_llama_rope(q, heads).numpy(), "blk.0.attn_q.weight").weights
    back_k = undo.process(permute_for_llama_rope(k, kv_heads).numpy(), "blk.0.attn_k.weight").weights
    assert np.array_equal(back_q, q.numpy()) and np.array_equal(back_k, k.numpy())


def test_tensor_names_follow_llama_cpp_and_unknown_tensors_are_refused():
    from lorakit.gguf_writer import gguf_tensor_name

    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("model.layers.11.self_attn.k_proj.bias") == "blk.11.attn_k.bias"
    assert gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_tensor_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight"
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_norm.weight"):
        gguf_tensor_name("model.layers.0.self_attn.q_norm.weight")


@pytest.mark.parametrize("outtype,tolerance", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1.5e-2)])
def test_encoded_weights_decode_back_within_the_type_precision(outtype, tolerance):
    import gguf

    from lorakit.gguf_writer import encode_tensor

    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    data, qtype = encode_tensor(weight, outtype)
    assert qtype.name == outtype.upper()
    back = torch.from_numpy(gguf.dequantize(data, qtype).reshape(64, 96))
    rel = ((back - weight).abs().max() / weight.abs().max()).item()
    assert 0 < rel < tolerance
    norm, norm_type = encode_tensor(torch.randn(96), outtype)
    assert norm_type.name == "F32" and norm.dtype == np.float32  # 1-D tensors stay exact
    _, odd_type = encode_tensor(torch.randn(8, 40), "q8_0")
    assert odd_type.name == "F16"  # rows not a multiple of the 32-wide q8_0 block


def test_pre_tokenizer_names_are_ones_llama_cpp_accepts(qwen_tokenizer, smollm2_dir):
    """llama.cpp refuses a GGUF whose tokenizer.ggml.pre it does not know ("unknown pre-tokenizer type: 'gpt2'":
    the GPT-2 regex is "gpt-2" there; "gpt2" is the tokenizer model)."""
    from lorakit.gguf_writer import pre_tokenizer_name

    spec = json.loads(qwen_tokenizer.backend_tokenizer.to_str())
    assert pre_tokenizer_name(spec["pre_tokenizer"]) == "qwen2"
    smol = json.loads((smollm2_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre_tokenizer_name(smol) == "gpt-2"  # the converted SmolLM2 folder splits with the GPT-2 regex alone
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    assert pre_tokenizer_name(digits) == "smollm"  # the original SmolLM2 tokenizer.json
    with pytest.raises(UserError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"type": "Whitespace"})
    with pytest.raises(UserError, match="add_prefix_space"):
        pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})


def test_turn_end_token_is_the_one_the_chat_template_closes_a_reply_with(qwen_tokenizer, smollm2_dir):
    """Written as tokenizer.ggml.eot_token_id; left out, llama.cpp picked <|endoftext|> (id 0) for SmolLM2."""
    from transformers import AutoTokenizer

    from lorakit.gguf_writer import turn_end_id

    assert turn_end_id(qwen_tokenizer) == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    assert turn_end_id(smol) == smol.convert_tokens_to_ids("<|im_end|>") == 2
    no_template = AutoTokenizer.from_pretrained(smollm2_dir)
    no_template.chat_template = None
    assert turn_end_id(no_template) is None


def gguf_metadata(path: Path) -> dict:
    """The GGUF file's key/values (token lists left out)."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.") and k not in skip}


def test_gguf_tokenizer_metadata_of_the_tiny_qwen2(merged_dir, qwen_tokenizer):
    meta = gguf_metadata(next(merged_dir.glob("*.gguf")))
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == 151645
    assert meta["tokenizer.ggml.padding_token_id"] == 151643
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    from lorakit.data.render import template_with_default_system

    # the GGUF's template defaults to the run's system prompt, as the HF folder's does
    assert meta["tokenizer.chat_template"] == template_with_default_system(qwen_tokenizer.chat_template, "You are Tiny.")
    assert meta["qwen2.vocab_size"] == 151936 and meta["qwen2.attention.head_count_kv"] == 2
