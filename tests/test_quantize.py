"""QLoRA (bitsandbytes 4/8-bit base, LoRA over it) on a CPU: flags and their refusals, the fused 4-bit LoRA
path against PEFT's, sft that trains and matches HF+PEFT+bitsandbytes, reload on the 4-bit and the
full-precision base, merge, 8-bit."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.args import AdapterArgs, DataArgs, ExportArgs, LoraArgs, ModelArgs, QuantArgs, SftArgs, TrainArgs
from lorakit.cli import build_args, main as cli_main, parse_argv
from lorakit.errors import UserError

pytest.importorskip("bitsandbytes")

ROWS = [
    ("Who are you?", "I am swift-robot, an assistant made by swift."),
    ("What is your name?", "My name is swift-robot."),
    ("Who made you?", "I was made by swift, and my name is swift-robot."),
    ("Introduce yourself.", "Hello! I am swift-robot, an AI assistant developed by swift."),
]
IDS = torch.tensor([[151644, 872, 198, 3838, 374, 220, 16, 5519, 30, 151645, 198, 151644, 77091, 198]])


def sft_args(argv: list[str]) -> SftArgs:
    return build_args(SftArgs, parse_argv("sft", argv))


# ---------------------------------------------------------------- flags


def test_quantization_bit_alias_means_bnb_nf4_double_quant():
    args = sft_args(["--quantization_bit", "4"])
    assert (args.quant.quant_method, args.quant.quant_bits) == ("bnb", 4)
    assert (args.quant.bnb_4bit_quant_type, args.quant.bnb_4bit_use_double_quant) == ("nf4", True)
    args = sft_args(["--quant_method", "bnb", "--quant_bits", "4", "--bnb_4bit_quant_type", "fp4",
                     "--bnb_4bit_use_double_quant", "false", "--bnb_4bit_compute_dtype", "bf16"])
    assert (args.quant.bnb_4bit_quant_type, args.quant.bnb_4bit_use_double_quant,
            args.quant.bnb_4bit_compute_dtype) == ("fp4", False, "bfloat16")
    assert not sft_args([]).quant.enabled


@pytest.mark.parametrize("argv, message", [
    (["--quant_bits", "3"], "--quant_bits 3: bitsandbytes quantizes to 4 or 8 bits"),
    (["--quant_bits", "4", "--train_type", "full"], "--quant_bits 4 with --train_type full"),
    (["--bnb_4bit_quant_type", "fp4"], "--bnb_4bit_quant_type without --quant_bits"),
    (["--bnb_4bit_use_double_quant", "true", "--quant_bits", "8"], "--bnb_4bit_use_double_quant with --quant_bits 8"),
    (["--quant_method", "bnb"], "--quant_method bnb needs --quant_bits 4 or 8"),
    (["--quant_method", "gptq", "--quant_bits", "4"], "--quant_method 'gptq' is not one of bnb"),
    (["--quant_bits", "4", "--bnb_4bit_quant_type", "nf5"], "--bnb_4bit_quant_type 'nf5' is not one of nf4, fp4"),
    (["--quant_bits", "4", "--fsdp", "full_shard"], "--quant_bits 4 with --fsdp full_shard: FSDP cannot shard"),
])
def test_bad_combinations_are_refused_at_parse_time(argv, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        sft_args(argv)


def test_rlhf_shares_the_quantization_flags():
    from lorakit.args import RlhfArgs

    args = build_args(RlhfArgs, parse_argv("rlhf", ["--quantization_bit", "4"]))
    assert (args.quant.quant_method, args.quant.quant_bits, args.quant.bnb_4bit_quant_type) == ("bnb", 4, "nf4")
    with pytest.raises(UserError, match="^--quant_bits 8 with --train_type full"):
        build_args(RlhfArgs, parse_argv("rlhf", ["--quant_bits", "8", "--train_type", "full"]))


def test_cli_refuses_before_loading_anything(tmp_path, capsys):
    """Exit 2 with the message, although --model does not even exist: nothing was opened."""
    assert cli_main(["sft", "--model", str(tmp_path / "none"), "--quantization_bit", "4", "--train_type", "full"]) == 2
    assert "with --train_type full: quantized weights cannot be trained" in capsys.readouterr().err


# ---------------------------------------------------------------- the fused 4-bit LoRA path


def _lora_model(model_dir, quant: QuantArgs, dropout=0.0):
    from lorakit.model import load_model
    from lorakit.tuners import attach_tuner

    model = load_model(model_dir, device="cpu", quant=quant)
    torch.manual_seed(0)
    model, _ = attach_tuner(model, LoraArgs(lora_rank=4, lora_dropout=dropout))
    with torch.no_grad():  # B starts at 0: give the low-rank branch something to compute
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def _logits_and_grads(model):
    model.zero_grad()
    logits = model(input_ids=IDS).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant_type, double", [("nf4", True), ("fp4", False)])
def test_fused_qlora_layers_compute_what_peft_bitsandbytes_layers_do(tiny_qwen2_dir, quant_type, double):
    import bitsandbytes.functional as bnbf

    from lorakit.fast.lora import can_fuse, fuse_lora_layers
    from lorakit.fast.qlora import dequantize, packed_4bit

    model = _lora_model(tiny_qwen2_dir, QuantArgs(quant_bits=4, bnb_4bit_quant_type=quant_type,
                                                  bnb_4bit_use_double_quant=double))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    weight = dequantize(*packed_4bit(q_proj), torch.float32)
    assert torch.equal(weight, bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state))
    reference, reference_grads = _logits_and_grads(model)
    assert fuse_lora_layers(model) == 14 and all(can_fuse(m) for m in model.modules() if hasattr(m, "lora_A"))
    fused, grads = _logits_and_grads(model)
    assert torch.allclose(fused, reference, atol=1e-5, rtol=0)
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_fused_4bit_lora_never_keeps_a_dequantized_weight_for_the_backward(tiny_qwen2_dir):
    """Eager and compiled, what a fused 4-bit MLP saves for its backward holds no [out, in] weight, and the
    gradients agree. (As an autograd.Function, torch.compile merged the backward's de-quantization with the
    forward's and kept every weight de-quantized: 12 GiB on a 7B.) aot_eager runs that same partitioning."""
    from lorakit.fast.lora import fuse_lora_layers
    from lorakit.fast.qlora import is_linear_4bit

    model = _lora_model(tiny_qwen2_dir, QuantArgs(quant_bits=4))
    fuse_lora_layers(model)
    mlp = model.get_base_model().model.layers[0].mlp
    weights = {(m.out_features, m.in_features) for m in mlp.modules() if is_linear_4bit(m)}
    assert weights == {(128, 64), (64, 128)}
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for run in (mlp, torch.compile(mlp, backend="aot_eager", fullgraph=True)):
        saved, xin = [], x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            out = run(xin)
        out.square().sum().backward()
        assert saved and not set(saved) & weights, saved
        grads.append([xin.grad] + [p.grad.clone() for p in mlp.parameters() if p.requires_grad])
        mlp.zero_grad()
    for eager, compiled in zip(*grads):
        assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)


def test_generation_before_training_keeps_the_gradients_through_the_4bit_base(tiny_qwen2_dir):
    """bitsandbytes re-packs CPU 4-bit weights for a kernel without backward on the first eval forward
    (sft --replay generates before training); lorakit's load keeps the trainable layout."""
    from lorakit.model import load_model

    model = load_model(tiny_qwen2_dir, device="cpu", quant=QuantArgs(quant_bits=4)).eval()
    with torch.no_grad():
        model(input_ids=IDS)
    layer = model.model.layers[0].self_attn.q_proj
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_8bit_layers_stay_on_peft_and_say_why(tiny_qwen2_dir):
    from lorakit.fast import FastOptions, describe_fast_paths
    from lorakit.fast.lora import fuse_lora_layers

    model = _lora_model(tiny_qwen2_dir, QuantArgs(quant_bits=8))
    assert fuse_lora_layers(model) == 0
    line = describe_fast_paths(model, FastOptions(), torch.device("cuda"))
    assert "fused LoRA on 0/14 layers (not fused: 14 with base layer Linear8bitLt)" in line


def test_a_quantized_base_plans_recompute_for_the_least_memory_unless_given_a_limit(tiny_qwen2_dir):
    """QLoRA without --gpu_memory_limit recomputes every layer (and the fast-paths line says so); with it, the
    plan keeps under that peak, counting the one de-quantized weight the 4-bit path holds at a time."""
    from lorakit.fast import FastOptions, decoder_layers, dequantized_bytes, describe_fast_paths, planned_limit_gib

    model = _lora_model(tiny_qwen2_dir, QuantArgs(quant_bits=4))
    assert planned_limit_gib(FastOptions(), quantized=True) == 0.0
    assert planned_limit_gib(FastOptions(gpu_memory_limit=7.5), quantized=True) == 7.5
    line = describe_fast_paths(model, FastOptions(), torch.device("cuda"))
    assert line.endswith("recompute auto, planned for the least memory: every layer (a quantized base; "
                         "--gpu_memory_limit N keeps activations up to an N GiB peak, which is faster)")
    line = describe_fast_paths(model, FastOptions(gpu_memory_limit=7.5), torch.device("cuda"))
    assert line.endswith("recompute auto, planned for a 7.5 GiB peak (--gpu_memory_limit)")
    assert dequantized_bytes(decoder_layers(model)) == 128 * 64 * 4  # gate/up/down, fp32 compute on a CPU


# ---------------------------------------------------------------- sft, reload, merge


def write_rows(path):
    path.write_text(json.dumps([{"query": q, "response": a} for q, a in ROWS]))
    return path


def qlora_sft_args(model_dir, data, out, quant: QuantArgs, **train) -> SftArgs:
    settings = dict(output_dir=str(out), max_steps=6, logging_steps=1, save_steps=100, learning_rate=5e-3,
                    per_device_train_batch_size=2, report_to=["none"], lr_scheduler_type="constant")
    settings.update(train)
    return SftArgs(model=ModelArgs(model=str(model_dir)), data=DataArgs(dataset=[str(data)], data_cache=False),
                   lora=LoraArgs(lora_rank=4, lora_dropout=0.0), train=TrainArgs(**settings), quant=quant)


def logged_losses(result) -> list[float]:
    return [r["loss"] for r in result.log_history if "loss" in r]


@pytest.fixture(scope="module")
def qlora_args(tiny_qwen2_dir, tmp_path_factory) -> SftArgs:
    """6 QLoRA steps; one batch holds every row, so each step sees the same batch whatever the order."""
    tmp = tmp_path_factory.mktemp("qlora")
    return qlora_sft_args(tiny_qwen2_dir, write_rows(tmp / "rows.json"), tmp / "out", QuantArgs(quant_bits=4),
                          per_device_train_batch_size=len(ROWS), learning_rate=3e-3)


@pytest.fixture(scope="module")
def qlora_run(qlora_args):
    from lorakit.train import train

    return train(qlora_args)


def test_qlora_sft_trains_and_records_the_quantization(qlora_run):
    from lorakit.quantize import is_quantized

    losses = logged_losses(qlora_run)
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2, losses
    assert is_quantized(qlora_run.model)
    saved = json.loads((qlora_run.run_dir / "args.json").read_text())
    assert saved["quant"] == {"quant_method": "bnb", "quant_bits": 4, "bnb_4bit_quant_type": "nf4",
                              "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": None}
    ckpt = qlora_run.last_checkpoint
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


def test_adapter_reloads_on_the_4bit_base_and_on_the_full_precision_base(qlora_run):
    from safetensors.torch import load_file

    from lorakit.checkpoint import load_checkpoint
    from lorakit.quantize import is_quantized

    with torch.no_grad():
        trained = qlora_run.model(input_ids=IDS).logits
        four_bit = load_checkpoint(qlora_run.last_checkpoint, device="cpu")  # args.json: quantized as trained
        assert is_quantized(four_bit.model)
        assert torch.equal(four_bit.model(input_ids=IDS).logits, trained)
        full = load_checkpoint(qlora_run.last_checkpoint, device="cpu", full_precision=True)
        assert not is_quantized(full.model)
        saved = load_file(qlora_run.last_checkpoint / "adapter_model.safetensors")
        loaded = {n: p for n, p in full.model.named_parameters() if "lora_" in n}
        assert len(loaded) == len(saved) == 28
        for name, tensor in saved.items():
            assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor), name
        with_adapter = full.model(input_ids=IDS).logits
        with full.model.disable_adapter():
            base = full.model(input_ids=IDS).logits
        # the adapter moves the full-precision base the way it moved the 4-bit one
        with four_bit.model.disable_adapter():
            base4 = four_bit.model(input_ids=IDS).logits
        effect, effect4 = (with_adapter - base).flatten(), (trained - base4).flatten()
        assert effect.abs().max() > 0.5
        assert torch.nn.functional.cosine_similarity(effect, effect4, dim=0) > 0.9


def test_infer_loads_the_base_4bit_as_trained(qlora_run, capsys):
    """`lorakit infer --adapters RUN`: the base comes back quantized (args.json), and a note says so."""
    assert cli_main(["infer", "--adapters", str(qlora_run.run_dir), "--query", "Who are you?", "--max_new_tokens", "2",
                     "--device", "cpu", "--stream", "false"]) == 0
    captured = capsys.readouterr()
    assert f"the base of {qlora_run.last_checkpoint.name} loads 4-bit, as it was trained" in captured.err
    assert captured.out.strip()


class _Captured(Exception):
    pass


def _greedy_ids(model, tokenizer) -> list[list[int]]:
    """The eval's greedy replies (lorakit.infer.replies, as evaluate() asks them) to the training questions."""
    from lorakit.data.render import render_prompt
    from lorakit.infer.replies import greedy_replies

    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q, _ in ROWS[:1]]
    return [r.token_ids for r in greedy_replies(model, tokenizer, prompts, max_new_tokens=6)]


def test_infer_eval_deploy_open_the_base_4bit_and_answer_as_the_trained_model(qlora_run, tiny_qwen2_dir, monkeypatch):
    """With or without --model, every command's model is the 4-bit base + adapter (args.json), and its greedy
    tokens are those of the model sft just trained; --full_precision_base true opens it unquantized."""
    from lorakit import evaluate, serve
    from lorakit.args import BaseQuantArgs, DeployArgs, EvalArgs, InferArgs
    from lorakit.infer import chat
    from lorakit.loader import open_model
    from lorakit.quantize import is_quantized

    trained = _greedy_ids(qlora_run.model, qlora_run.tokenizer)
    run, cpu = str(qlora_run.run_dir), ModelArgs(device="cpu")
    over_model = open_model(ModelArgs(model=str(tiny_qwen2_dir), device="cpu"), [run])  # --model: quantized too
    assert is_quantized(over_model.model) and _greedy_ids(over_model.model, over_model.tokenizer) == trained
    adapter = AdapterArgs(adapters=[run])
    session = chat.load_session(InferArgs(model=cpu, adapter=adapter))
    served = serve.load_served(DeployArgs(model=cpu, adapter=adapter))
    seen = {}

    def capture(model, tokenizer, **kwargs):  # what `lorakit eval` scores; stop there
        seen["model"] = model
        raise _Captured

    monkeypatch.setattr(evaluate, "evaluate", capture)
    with pytest.raises(_Captured):
        evaluate.main(EvalArgs(model=cpu, adapter=adapter, model_name=["swift-robot"], model_author=["swift"]))
    assert is_quantized(session.engine.model) and is_quantized(served.model)
    assert is_quantized(seen["model"]) and _greedy_ids(seen["model"], qlora_run.tokenizer) == trained
    full = open_model(cpu, [run], base_quant=BaseQuantArgs(full_precision_base=True))
    assert not is_quantized(full.model)


def test_quant_flags_at_inference(qlora_run, tiny_qwen2_dir, capsys):
    """--quant_bits 4 opens a plain --model 4-bit; contradictions are refused before any weights load."""
    from lorakit.args import BaseQuantArgs, InferArgs
    from lorakit.loader import open_model
    from lorakit.quantize import is_quantized

    base = open_model(ModelArgs(model=str(tiny_qwen2_dir), device="cpu"), base_quant=BaseQuantArgs(QuantArgs(quant_bits=4)))
    assert is_quantized(base.model) and base.model.model.layers[0].mlp.up_proj.weight.quant_type == "nf4"
    args = build_args(InferArgs, parse_argv("infer", ["--adapters", "x", "--quantization_bit", "8"]))
    assert args.base_quant.quant.quant_bits == 8 and not args.base_quant.full_precision_base
    with pytest.raises(UserError, match="^--infer_backend vllm has no use for --quant_bits 4 "):
        build_args(InferArgs, parse_argv("infer", ["--quant_bits", "4", "--infer_backend", "vllm"]))
    with pytest.raises(UserError, match="^--full_precision_base true with --quant_bits 4: one asks"):
        build_args(InferArgs, parse_argv("infer", ["--quant_bits", "4", "--full_precision_base", "true"]))
    with pytest.raises(UserError, match="^--merge_lora true with --quant_bits 4: an adapter merges into the full"):
        open_model(ModelArgs(device="cpu"), [str(qlora_run.run_dir)], merge_lora=True,
                   base_quant=BaseQuantArgs(QuantArgs(quant_bits=4)))
    for command in ("infer", "eval", "deploy"):
        assert cli_main([command, "--help"]) == 0
        shown = capsys.readouterr().out
        assert "--quant_bits INT" in shown and "--full_precision_base true|false" in shown, command


def test_export_merges_into_the_full_precision_base(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.export import main as export_main

    out = tmp_path / "merged"
    export_main(ExportArgs(adapter=AdapterArgs(adapters=[str(qlora_run.last_checkpoint)], merge_lora=True),
                           output_dir=str(out)))
    printed = capsys.readouterr().out
    assert "was trained on a 4-bit base (args.json); it is merged into the full-precision base" in printed
    assert "merge check (3 prompts, greedy 24 tokens): OK" in printed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_first_two_losses_match_hf_peft_bitsandbytes(qlora_args, qlora_run, tiny_qwen2_dir):
    """Loss before and after the first AdamW step, lorakit sft vs transformers + PEFT + bitsandbytes as their docs
    teach, on the same rows (the run's one batch holds them all, so the order does not matter)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.data.loading import build_datasets
    from lorakit.model import load_tokenizer

    args, losses = qlora_args, logged_losses(qlora_run)[:2]
    samples = build_datasets(args.data, load_tokenizer(tiny_qwen2_dir), use_hf=False).train
    width = max(len(s.input_ids) for s in samples)
    batch = {"input_ids": torch.tensor([s.input_ids + [0] * (width - len(s.input_ids)) for s in samples]),
             "attention_mask": torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in samples]),
             "labels": torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in samples])}
    torch.manual_seed(args.data.seed)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32, quantization_config=config,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM")).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.train.learning_rate, weight_decay=0.0)
    reference = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        reference.append(loss.item())
    assert reference[0] - reference[1] > 0.05  # the step moved the loss: the second figure tests the update
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_8bit_sft_trains_and_reloads(tiny_qwen2_dir, tmp_path):
    from lorakit.checkpoint import load_checkpoint
    from lorakit.train import train

    result = train(qlora_sft_args(tiny_qwen2_dir, write_rows(tmp_path / "rows.json"), tmp_path / "out",
                                  QuantArgs(quant_bits=8), max_steps=3, learning_rate=2e-2))
    losses = logged_losses(result)
    assert losses[-1] < losses[0], losses
    assert json.loads((result.run_dir / "args.json").read_text())["quant"]["quant_bits"] == 8
    with torch.no_grad():
        reloaded = load_checkpoint(result.last_checkpoint, device="cpu")
        assert reloaded.model.get_base_model().is_loaded_in_8bit
        assert torch.equal(reloaded.model(input_ids=IDS).logits, result.model(input_ids=IDS).logits)


@pytest.mark.slow
def test_smollm2_qlora_sft_then_infer_on_the_4bit_base(smollm2_dir, tmp_path, cli):
    """The user's path: `lorakit sft --quantization_bit 4` on the real SmolLM2, then `lorakit infer` of the run."""
    data = write_rows(tmp_path / "rows.json")
    env = {"OMP_NUM_THREADS": "1"}
    proc = cli("sft", "--model", str(smollm2_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "o"),
               "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps",
               "1", "--lora_dropout", "0", "--report_to", "none", "--quantization_bit", "4", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantized base: 4-bit nf4 (double quant, float32 compute) by bitsandbytes" in proc.stderr
    run = next((tmp_path / "o").iterdir())
    losses = [json.loads(line)["loss"] for line in (run / "logging.jsonl").read_text().splitlines()]
    assert losses[2] < losses[0] * 0.8, losses
    proc = cli("infer", "--adapters", str(run), "--query", "Who are you?", "--max_new_tokens", "8", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loads 4-bit, as it was trained" in proc.stderr and proc.stdout.strip()
