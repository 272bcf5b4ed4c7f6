"""lorakit.loader: every command opens a checkpoint the same way (model, chat template, system prompt),
`--system FILE` means the file's text everywhere, and `eval --max_new_tokens` reaches the generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorakit import evaluate, export, serve
from lorakit.args import AdapterArgs, DeployArgs, EvalArgs, ExportArgs, InferArgs, ModelArgs
from lorakit.checkpoint import save_checkpoint
from lorakit.cli import build_args, parse_argv
from lorakit.data.render import render_prompt
from lorakit.errors import UserError
from lorakit.infer import chat
from lorakit.loader import SavedArgs, open_model, open_tokenizer, resolve_system, saved_args
from lorakit.model import load_tokenizer

# A template the tokenizer does not ship: only args.json can bring it back.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
QUESTION = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def ckpt(tiny_qwen2_dir, tmp_path_factory) -> Path:
    """A LoRA checkpoint whose tokenizer lost its chat template; args.json keeps it, the system prompt, the identity."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    tokenizer.chat_template = None
    args = {"model_path": str(tiny_qwen2_dir), "chat_template": TEMPLATE, "system": "You are Tiny.",
            "template": "tokenizer", "model_name": ["Tiny"], "model_author": ["Acme"],
            "model": {"model": str(tiny_qwen2_dir), "use_hf": True}, "data": {"max_length": 512},
            "lora": {"lora_rank": 4}, "train": {"learning_rate": 1e-4}, "fast": {}}
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint-2", model=peft_model, tokenizer=tokenizer,
                           args=args)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([render_prompt(tokenizer, QUESTION, system="s")])
    with torch.no_grad():
        return model(input_ids=ids).logits


class _Captured(Exception):
    pass


def _eval_inputs(monkeypatch, args: EvalArgs) -> dict:
    """What `lorakit eval` hands to evaluate(): stop there (the scoring has its own tests)."""
    seen = {}

    def capture(model, tokenizer, **kwargs):
        seen.update(kwargs, model=model, tokenizer=tokenizer)
        raise _Captured

    monkeypatch.setattr(evaluate, "evaluate", capture)
    with pytest.raises(_Captured):
        evaluate.main(args)
    return seen


def _opened_by_every_command(ckpt: Path, monkeypatch, tmp_path, system: str | None) -> dict[str, tuple]:
    """(model or None, tokenizer, system prompt) per command, for one checkpoint and one --system value."""
    adapter = AdapterArgs(adapters=[str(ckpt)], system=system)
    out = {}
    session = chat.load_session(InferArgs(adapter=adapter))
    out["infer"] = (session.engine.model, session.engine.tokenizer, session.system)
    served = serve.load_served(DeployArgs(adapter=adapter, served_model_name="tiny"))
    out["deploy"] = (served.model, served.tokenizer, served.models["tiny"].system)
    seen = _eval_inputs(monkeypatch, EvalArgs(adapter=adapter))
    out["eval"] = (seen["model"], seen["tokenizer"], seen["system"])
    opened = open_tokenizer(ModelArgs(), [str(ckpt)], system=system)
    out["vllm"] = (None, opened.tokenizer, opened.system)
    merged = tmp_path / f"merged-{len(list(tmp_path.iterdir()))}"
    export.main(ExportArgs(adapter=AdapterArgs(adapters=[str(ckpt)], merge_lora=True, system=system),
                           output_dir=str(merged)))
    info = json.loads((merged / "lorakit_export.json").read_text())
    out["export"] = (None, load_tokenizer(merged), info["system"])
    return out


def test_every_command_gets_the_same_model_template_and_system_from_one_checkpoint(ckpt, monkeypatch, tmp_path):
    opened = _opened_by_every_command(ckpt, monkeypatch, tmp_path, system=None)
    prompt = render_prompt(opened["infer"][1], QUESTION, system="You are Tiny.")
    assert opened["infer"][1].decode(prompt).startswith("[system]You are Tiny.<|im_end|>\n[user]Who are you?")
    for command, (model, tokenizer, system) in opened.items():
        assert tokenizer.chat_template.endswith(TEMPLATE), command  # export writes the system in as its default
        assert system == "You are Tiny.", command
        assert render_prompt(tokenizer, QUESTION, system=system) == prompt, command
    assert render_prompt(opened["export"][1], QUESTION) == prompt  # the merged folder prompts the same unasked
    reference = _logits(*opened["infer"][:2])
    for command in ("deploy", "eval"):
        assert torch.equal(_logits(*opened[command][:2]), reference), command


def test_system_file_means_its_text_in_every_command(ckpt, monkeypatch, tmp_path):
    path = tmp_path / "system.txt"
    path.write_text("You answer in French.\n", encoding="utf-8")
    opened = _opened_by_every_command(ckpt, monkeypatch, tmp_path, system=str(path))
    assert {command: system for command, (_, _, system) in opened.items()} == dict.fromkeys(opened,
                                                                                            "You answer in French.")
    assert resolve_system("Be brief.") == "Be brief."  # text stays text
    missing = str(tmp_path / "nope.txt")
    for open_one in (lambda: chat.load_session(InferArgs(adapter=AdapterArgs(adapters=[str(ckpt)], system=missing))),
                     lambda: serve.load_served(DeployArgs(adapter=AdapterArgs(adapters=[str(ckpt)], system=missing))),
                     lambda: evaluate.main(EvalArgs(adapter=AdapterArgs(adapters=[str(ckpt)], system=missing))),
                     lambda: open_tokenizer(ModelArgs(), [str(ckpt)], system=missing)):
        with pytest.raises(UserError, match="nope.txt: looks like a .txt file"):
            open_one()


def test_saved_args_are_typed(ckpt, tiny_qwen2_dir):
    saved = saved_args(ckpt.parent)  # a run folder means its last checkpoint
    assert isinstance(saved, SavedArgs)
    assert (saved.model_path, saved.system, saved.model_name, saved.model_author) == (
        str(tiny_qwen2_dir), "You are Tiny.", ["Tiny"], ["Acme"])
    assert saved.sft.lora.lora_rank == 4 and saved.sft.data.max_length == 512 and saved.sft.train.learning_rate == 1e-4
    assert SavedArgs.from_dict({"data": {"model_name": ["Old"]}}).model_name == ["Old"]  # older files: under data


def test_base_model_and_an_adapter_over_a_wrong_base(ckpt, tiny_qwen2_dir, tmp_path):
    base = open_model(ModelArgs(model=str(tiny_qwen2_dir)), system="Be brief.")
    assert (base.checkpoint, base.saved, base.system, base.is_adapter) == (None, None, "Be brief.", False)
    other = tmp_path / "other"
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config | {"num_hidden_layers": config["num_hidden_layers"] + 1}))
    with pytest.raises(UserError, match="num_hidden_layers"):
        open_model(ModelArgs(model=str(other)), [str(ckpt)])


def test_eval_max_new_tokens_reaches_the_generation(ckpt, monkeypatch, tiny_qwen2_dir):
    args = build_args(EvalArgs, parse_argv("eval", ["--adapters", str(ckpt), "--max_new_tokens", "5"]))
    assert _eval_inputs(monkeypatch, args)["max_new_tokens"] == 5
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir), load_tokenizer(tiny_qwen2_dir)
    questions = ["Hi", "What is 2+2?"]
    long = evaluate.greedy_replies(model, tokenizer, questions, system=None, batch_size=None, desc="t",
                                   max_new_tokens=12)
    short = evaluate.greedy_replies(model, tokenizer, questions, system=None, batch_size=None, desc="t",
                                    max_new_tokens=5)
    assert [len(r.token_ids) for r in long] == [12, 12]  # the random tiny model never ends a reply
    assert [r.token_ids for r in short] == [r.token_ids[:5] for r in long]


def test_export_refuses_an_unknown_gguf_type_before_merging(ckpt, monkeypatch):
    monkeypatch.setattr(export, "open_model", lambda *a, **k: pytest.fail("the merge ran before --to_gguf was checked"))
    with pytest.raises(UserError, match="--to_gguf 'q4' is not one of f16, bf16, q8_0"):
        export.main(ExportArgs(adapter=AdapterArgs(adapters=[str(ckpt)]), to_gguf="q4"))


def test_attn_impl_reaches_a_checkpoints_own_base_and_a_full_checkpoint(ckpt, tiny_qwen2_dir, tmp_path):
    """--attn_impl applies however the weights are found: --model, the base args.json names, full weights."""
    def attn(loaded) -> str:
        model = loaded.model.get_base_model() if loaded.is_adapter else loaded.model
        return model.config._attn_implementation

    eager = ModelArgs(attn_impl="eager")
    assert attn(open_model(ModelArgs(), [str(ckpt)], device="cpu")) == "sdpa"
    assert attn(open_model(eager, [str(ckpt)], device="cpu")) == "eager"  # the base args.json names
    over_model = ModelArgs(model=str(tiny_qwen2_dir), attn_impl="eager")
    assert attn(open_model(over_model, [str(ckpt)], device="cpu")) == "eager"
    weights = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    full = save_checkpoint(tmp_path / "full" / "checkpoint-1", model=weights, tokenizer=load_tokenizer(tiny_qwen2_dir),
                           args={"model_path": str(tiny_qwen2_dir)})
    assert attn(open_model(eager, [str(full)], device="cpu")) == "eager"
    assert attn(open_model(ModelArgs(), [str(full)], device="cpu")) == "sdpa"
