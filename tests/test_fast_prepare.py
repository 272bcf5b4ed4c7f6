"""prepare_for_training: every combination of fast paths computes the reference loss and grads."""

from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from lorakit.fast import FastOptions, decoder_layers, plan_checkpointing, prepare_for_training, restore_reference
from lorakit.errors import UserError
from lorakit.loss import causal_lm_loss, hidden_states

CFG = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=1000, attn_implementation="sdpa",
)


def lora_model(layers: int = 2):
    torch.manual_seed(0)
    config = Qwen2Config(**CFG | {"num_hidden_layers": layers})
    model = get_peft_model(Qwen2ForCausalLM(config).float(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def packed_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 20), generator=g)
    pos = torch.stack([torch.cat([torch.arange(9), torch.arange(11)]), torch.cat([torch.arange(4), torch.arange(16)])])
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def loss_and_grads(model, fused, saved=None):
    """Loss, grads; `saved` (a list) collects the bytes autograd keeps for backward."""
    saved = [] if saved is None else saved

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = causal_lm_loss(model, packed_batch(), fused=fused)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_for_device_cpu_is_reference():
    assert FastOptions.for_device("cpu") == FastOptions.reference()
    assert FastOptions.for_device("cuda") == FastOptions()
    with pytest.raises(UserError, match="gradient_checkpointing"):
        FastOptions(gradient_checkpointing="selective")


@pytest.mark.parametrize(
    "opts",
    [
        FastOptions(torch_compile=False, gradient_checkpointing=False),
        FastOptions(torch_compile=False, gradient_checkpointing=True),
        FastOptions(torch_compile=False, fused_lora=False, fused_loss=False, gradient_checkpointing=True),
        FastOptions(torch_compile=False, packed_attention=False, gradient_checkpointing=False),
    ],
)
def test_fast_paths_equal_reference(opts):
    ref_saved, saved = [], []
    ref_loss, ref_grads = loss_and_grads(lora_model(), fused=False, saved=ref_saved)
    model = prepare_for_training(lora_model(), opts)
    loss, grads = loss_and_grads(model, fused=opts.fused_loss, saved=saved)
    if opts.checkpointing == "full":  # only the layer inputs (and the head's needs) are kept
        no_ckpt = []
        loss_and_grads(prepare_for_training(lora_model(), replace(opts, gradient_checkpointing=False)), opts.fused_loss, no_ckpt)
        assert sum(saved) < 0.5 * sum(no_ckpt)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def padded_batch():
    """Rows of 20, 13 and 6 real tokens, right-padded, the last row left-padded (as a generation batch is)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (3, 20), generator=g)
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0], mask[1, :13], mask[2, 14:] = 1, 1, 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = labels[2, 14:17] = -100  # each row's prompt: the padding before it predicts nothing
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_padding_is_dropped_before_the_layers():
    """Padded rows run as one packed row of their real tokens; loss and grads equal the padded reference."""
    ref = lora_model()
    ref_out = causal_lm_loss(ref, padded_batch(), fused=False)
    ref_out.loss_sum.backward()
    model = prepare_for_training(lora_model(), FastOptions(torch_compile=False, gradient_checkpointing=False))
    shapes = []
    decoder_layers(model)[0].register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple((a[0] if a else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    out = causal_lm_loss(model, padded_batch(), fused=True)
    out.loss_sum.backward()
    assert shapes == [(1, 20 + 13 + 6)]
    torch.testing.assert_close(out.loss_sum, ref_out.loss_sum, rtol=1e-6, atol=1e-4)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def prefix_batch():
    """A 7-token prefix that rows of 9 and 5 real tokens continue (right-padded), and a row of 6 that does not."""
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[0], mask[1, :5], mask[2, :6] = 1, 1, 1
    return {"prefix_ids": torch.randint(0, 1000, (1, 7), generator=g),
            "input_ids": torch.randint(0, 1000, (3, 9), generator=g),
            "attention_mask": mask, "prefix_rows": torch.tensor([True, True, False])}


def projected_hidden(model, rows, weights):
    """sum(hidden * weights) over the real tokens of each (row, starts) run as the plain model runs it."""
    body = model.get_base_model().get_decoder()
    total = 0.0
    for (ids, skip), w in zip(rows, weights):
        total = total + (body(input_ids=ids[None]).last_hidden_state[0, skip:] * w[: ids.numel() - skip]).sum()
    return total


def test_a_shared_prefix_runs_once_in_the_packed_row():
    """rlhf's pair layout: the prefix runs once for the rows that continue it. The GPU's way (prefix and rows as one
    packed row, each row's attention reading the prefix's keys) and the CPU's (a KV cache) both give every row the
    hidden states, and the LoRA weights the gradients, of a plain forward of each whole row."""
    batch = prefix_batch()
    weights = torch.randn(3, 9, CFG["hidden_size"], generator=torch.Generator().manual_seed(1))
    real = batch["attention_mask"].bool()
    ref = lora_model()
    whole = [(torch.cat([batch["prefix_ids"][0], batch["input_ids"][r, real[r]]]) if batch["prefix_rows"][r]
              else batch["input_ids"][r, real[r]], 7 if batch["prefix_rows"][r] else 0) for r in range(3)]
    total = projected_hidden(ref, whole, weights)
    total.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    cached = lora_model()
    packed = prepare_for_training(lora_model(), FastOptions(torch_compile=False, gradient_checkpointing=False))
    shapes = []
    decoder_layers(packed)[0].register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple((a[0] if a else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    for model in (cached, packed):
        hidden = hidden_states(model, batch)
        assert hidden.shape == (3, 9, CFG["hidden_size"])
        got = (hidden * weights * real[..., None]).sum()
        torch.testing.assert_close(got, total, rtol=1e-5, atol=1e-4)
        got.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-4, msg=name)
    assert shapes == [(1, 7 + 9 + 5 + 6)]  # one packed row: the prefix once


def test_compiled_layers_trace_without_graph_breaks():
    """The GPU default compiles each block; check dynamo traces our code on CPU (aot_eager)."""
    torch._dynamo.reset()
    ref_loss, ref_grads = loss_and_grads(lora_model(), fused=False)
    model = prepare_for_training(lora_model(), FastOptions(torch_compile=False, gradient_checkpointing=True))
    for layer in decoder_layers(model):
        layer.compile(backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(model, fused=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_plan_checkpointing_fits_budget():
    # 10 layers, 100 tokens, 50 B/token/layer kept, 5 with recompute
    assert plan_checkpointing(10, 100, 50, 5, budget_bytes=10 * 100 * 50 + 100 * 50) == 0
    assert plan_checkpointing(10, 100, 50, 5, budget_bytes=0) == 10
    n = plan_checkpointing(10, 100, 50, 5, budget_bytes=30_000)
    kept = 10 - n
    assert 100 * (kept * 50 + n * 5 + 50) <= 30_000 < 100 * ((kept + 1) * 50 + (n - 1) * 5 + 50)


def test_compiled_layers_share_one_graph_and_keep_it_when_prepared_again():
    """Every decoder layer's fused LoRA projections share their code, so the compiled layers trace twice (the
    first layer's input needs no grad, the others' do), not once per layer; re-preparing changes nothing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = prepare_for_training(lora_model(layers=4), FastOptions(torch_compile=False))
    counter = CompileCounterWithBackend("eager")
    for layer in decoder_layers(model):
        layer.compile(backend=counter)
    causal_lm_loss(model, packed_batch(), fused=True).loss_sum.backward()
    assert counter.frame_count == 2
    prepare_for_training(model, FastOptions(torch_compile=False, gpu_memory_limit=10))
    causal_lm_loss(model, packed_batch(), fused=True).loss_sum.backward()
    assert counter.frame_count == 2


def test_restore_reference_undoes_prepare():
    model = prepare_for_training(lora_model(), FastOptions(torch_compile=False, gradient_checkpointing=True))
    prepare_for_training(model, FastOptions(torch_compile=False, gradient_checkpointing=False))  # again: replaces
    restore_reference(model)
    base = model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) or type(m).__name__.startswith("Fused") for m in model.modules())
    assert not base.model._forward_pre_hooks
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))


def test_generation_on_prepared_model_equals_reference():
    """A prepared model still generates (KV cache, left padding) exactly like the reference."""
    prompts = torch.tensor([[0, 0, 5, 17, 42], [3, 9, 11, 7, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = []
    for prepare in (False, True):
        model = lora_model().eval()
        if prepare:
            prepare_for_training(model, FastOptions(torch_compile=False, gradient_checkpointing=None))
        with torch.no_grad():
            outs.append(model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0))
        if prepare:  # training-style forwards still take the packed path afterwards
            assert loss_and_grads(model.train(), fused=True)[0].isfinite()
    assert torch.equal(outs[0], outs[1])
