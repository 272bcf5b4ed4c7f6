"""`lorakit infer` as a user runs it: REPL over stdin, --query, batch files, checkpoints, bad input.

Expected answers are generated in-process with the engine on the same weights, so the CLI is
checked token for token (greedy decoding is exact)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tiny_qwen2_config
from lorakit.cli import main as cli_main
from lorakit.data.render import render_prompt
from lorakit.infer import chat
from lorakit.infer.engine import Engine, Generation, SamplingParams

NEW = 6  # tokens per answer in these tests
CUT = f"\n[cut: reached --max_new_tokens {NEW}]\n"


@pytest.fixture(scope="module")
def tiny(tiny_qwen2_dir):
    """The tiny model and tokenizer loaded the way the CLI loads them, with an engine."""
    from lorakit.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_qwen2_dir)
    model = load_model(tiny_qwen2_dir, torch_dtype="float32", device="cpu")
    return Engine(model, tokenizer)


def replies(engine: Engine, turns: list[str], system: str | None = None) -> list[str]:
    """What a multi-turn chat should answer, turn by turn (history = earlier turns and replies)."""
    history, out = [], []
    for user in turns:
        messages = history + [{"role": "user", "content": user}]
        prompt = render_prompt(engine.tokenizer, messages, system=system)
        text = engine.generate([prompt], SamplingParams(max_new_tokens=NEW))[0].text
        out.append(text)
        history = messages + [{"role": "assistant", "content": text}]
    return out


def assert_in_order(text: str, pieces: list[str]) -> None:
    at = 0
    for piece in pieces:
        found = text.find(piece, at)
        assert found >= 0, (piece, text[at:])
        at = found + len(piece)


# ---------------------------------------------------------------- subprocess: as a user runs it


def test_repl_over_stdin_multi_turn_commands_and_ctrl_d(tiny_qwen2_dir, tiny):
    stdin = "Who are you?\nAnd then?\n/clear\nAnd then?\n/system Be brief.\nhello \\\nworld\n"  # then EOF = Ctrl-D
    proc = run_cli("infer", "--model", str(tiny_qwen2_dir), "--max_new_tokens", str(NEW), "--temperature", "0",
                   input=stdin)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = replies(tiny, ["Who are you?", "And then?"])
    (fresh,) = replies(tiny, ["And then?"])
    (brief,) = replies(tiny, ["hello \nworld"], system="Be brief.")
    assert second != fresh  # the second turn saw the first: history really reaches the prompt
    assert_in_order(proc.stdout, [">>> " + first + CUT, ">>> " + second + CUT, "[history cleared]",
                                  ">>> " + fresh + CUT, "[system prompt set: 'Be brief.'; history cleared]",
                                  ">>> ... " + brief + CUT])
    assert proc.stdout.endswith(">>> \n")  # Ctrl-D at the prompt leaves cleanly


def test_query_one_shot_streams_the_exact_greedy_answer(tiny_qwen2_dir, tiny):
    proc = run_cli("infer", "--model", str(tiny_qwen2_dir), "--query", "Who are you?", "--max_new_tokens", str(NEW),
                   "--stream", "true", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == replies(tiny, ["Who are you?"])[0] + CUT


# ---------------------------------------------------------------- in-process CLI


def test_batch_result_file(tiny_qwen2_dir, tiny, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A bot."}]},
            {"query": "What is 2+2?", "response": "4"},
            {"query": "Only a question, no answer."}]
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "results" / "out.jsonl"
    rc = cli_main(["infer", "--model", str(tiny_qwen2_dir), "--val_dataset", str(data), "--result_path", str(out),
                   "--max_new_tokens", str(NEW), "--max_batch_size", "2"])
    assert rc == 0
    assert f"wrote 3 results to {out}" in capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    questions = ["Who are you?", "What is 2+2?", "Only a question, no answer."]
    assert [r["messages"] for r in lines] == [[{"role": "user", "content": q}] for q in questions]
    assert [r["reference"] for r in lines] == ["A bot.", "4", None]
    assert [r["response"] for r in lines] == [replies(tiny, [q])[0] for q in questions]
    for r, q in zip(lines, questions):
        assert r["prompt_tokens"] == len(render_prompt(tiny.tokenizer, [{"role": "user", "content": q}]))
        assert r["completion_tokens"] == NEW and r["finish_reason"] == "length"
        assert r["source"].startswith(str(data))


def test_prompt_longer_than_the_context_is_cut_with_a_notice(tiny_qwen2_dir, capsys):
    rc = cli_main(["infer", "--model", str(tiny_qwen2_dir), "--query", "word " * 5000, "--max_new_tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "more than the 4092 that fit the model's context (4096)" in captured.err
    assert "kept its last 4092 tokens" in captured.err and captured.out.strip()


def test_vllm_backend_missing_says_how_to_install(tiny_qwen2_dir, capsys):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    assert cli_main(["infer", "--model", str(tiny_qwen2_dir), "--query", "hi", "--infer_backend", "vllm"]) == 2
    assert "pip install vllm" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def adapter_run(tiny_qwen2_dir, tmp_path_factory):
    """A run folder with one LoRA checkpoint on the tiny model (random, non-zero B), as sft writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("run") / "v0-20261122-000000"
    ckpt = run / "checkpoint-2"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(ckpt)
    for f in Path(tiny_qwen2_dir).glob("tokenizer*.json"):
        shutil.copy(f, ckpt / f.name)
    args = {"model_path": str(tiny_qwen2_dir), "system": "You are a robot."}
    for folder in (run, ckpt):
        (folder / "args.json").write_text(json.dumps(args))
    return run


def _query(*flags: str, capsys) -> str:
    assert cli_main(["infer", "--query", "Who are you?", "--max_new_tokens", str(NEW), *flags]) == 0
    return capsys.readouterr().out


def test_adapter_from_run_folder_uses_its_base_and_system_and_merge_gives_the_same(adapter_run, tiny_qwen2_dir,
                                                                                    tiny, capsys):
    from lorakit.checkpoint import load_checkpoint

    with_adapter = _query("--adapters", str(adapter_run), capsys=capsys)
    merged = _query("--adapters", str(adapter_run / "checkpoint-2"), "--merge_lora", "true", capsys=capsys)
    base = _query("--model", str(tiny_qwen2_dir), "--system", "You are a robot.", capsys=capsys)
    loaded = load_checkpoint(adapter_run, device="cpu")
    expect = Engine(loaded.model, loaded.tokenizer).generate(
        [render_prompt(loaded.tokenizer, [{"role": "user", "content": "Who are you?"}], system="You are a robot.")],
        SamplingParams(max_new_tokens=NEW))[0].text
    assert with_adapter == merged == expect + CUT
    assert base != with_adapter  # the adapter changes the answer


def test_adapter_on_another_architecture_is_a_clear_error(adapter_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-base"
    AutoModelForCausalLM.from_config(tiny_qwen2_config(hidden_size=32, intermediate_size=64)).save_pretrained(other)
    rc = cli_main(["infer", "--adapters", str(adapter_run), "--model", str(other), "--query", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "differs from --model" in err and "hidden_size 64 vs 32" in err


def test_bad_checkpoint_paths(tmp_path, capsys):
    run = tmp_path / "v0-run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-2").mkdir()
    assert cli_main(["infer", "--adapters", str(run / "checkpoint-2"), "--query", "hi"]) == 2
    err = capsys.readouterr().err
    assert "has no adapter_config.json" in err and "checkpoint-1, checkpoint-2" in err
    assert cli_main(["infer", "--adapters", str(run), "--query", "hi"]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "checkpoint-1, checkpoint-2" in err
    empty = tmp_path / "v1-empty"
    empty.mkdir()
    assert cli_main(["infer", "--adapters", str(empty), "--query", "hi"]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert cli_main(["infer", "--adapters", str(tmp_path / "missing"), "--query", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the REPL's logic, with a scripted engine


class ScriptedEngine:
    """Stands in for the engine: records each prompt and streams 'reply N' in two pieces;
    `interrupt` makes the given answer raise KeyboardInterrupt (Ctrl-C) after its first piece."""

    def __init__(self, tokenizer, interrupt: int | None = None):
        self.tokenizer, self.context, self.prompts, self.interrupt = tokenizer, 4096, [], interrupt

    def stream(self, prompt, params):
        self.prompts.append(tokenizer_text(self.tokenizer, prompt))
        n = len(self.prompts)
        yield f"reply {n}"[:4]
        if n == self.interrupt:
            raise KeyboardInterrupt
        yield f"reply {n}"[4:]
        self.last_generation = Generation([1], f"reply {n}", "stop", len(prompt), 2)


def tokenizer_text(tokenizer, ids):
    return tokenizer.decode(ids)


def _repl(engine, lines, *, system=None):
    feed = iter(lines)
    asked = []

    def read(prompt):
        asked.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    import io

    out = io.StringIO()
    session = chat.ChatSession(engine, system, "scripted")
    rc = chat.run_repl(session, SamplingParams(max_new_tokens=8), stream=True, read=read, out=out)
    return rc, out.getvalue(), asked


def test_repl_ctrl_c_stops_the_answer_and_keeps_history(qwen_tokenizer):
    engine = ScriptedEngine(qwen_tokenizer, interrupt=2)
    rc, out, _ = _repl(engine, ["first", "second", "third", "/exit", "never read"])
    assert rc == 0 and "[stopped]" in out and len(engine.prompts) == 3
    third = engine.prompts[2]
    assert_in_order(third, ["first", "reply 1", "second", "repl", "third"])  # the partial answer stays
    assert "reply 2" not in third


def test_repl_multiline_system_clear_and_unknown_commands(qwen_tokenizer):
    engine = ScriptedEngine(qwen_tokenizer)
    lines = ['"""', "line one", 'line two"""', "/system You are terse.", "a \\", "b", "/clear", "/help", "c", "/quit"]
    rc, out, asked = _repl(engine, lines, system="Default system.")
    assert rc == 0
    first, second, third = engine.prompts
    assert "line one\nline two<|im_end|>" in first and "Default system." in first
    assert "You are terse." in second and "a \nb<|im_end|>" in second and "line one" not in second
    assert "You are terse." in third and "a \nb" not in third  # /clear kept the system prompt
    assert "[unknown command /help]" in out
    assert asked == [">>> ", "... ", "... ", ">>> ", ">>> ", "... ", ">>> ", ">>> ", ">>> ", ">>> "]


@pytest.mark.slow
def test_tutorial_command_on_a_smollm2_checkpoint(smollm2_dir, tmp_path):
    """`swift infer --adapters ckpt --stream true --temperature 0 --max_new_tokens 2048`, as lorakit."""
    data = tmp_path / "identity.json"
    data.write_text(json.dumps([{"query": "Who are you?", "response": "I am Robo, made by Ann."}] * 4))
    out = tmp_path / "output"
    train = run_cli("sft", "--model", str(smollm2_dir), "--dataset", str(data), "--output_dir", str(out),
                    "--max_steps", "2", "--lora_rank", "4", "--save_steps", "2")
    assert train.returncode == 0, train.stderr[-3000:]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    proc = run_cli("infer", "--adapters", str(run), "--stream", "true", "--temperature", "0",
                   "--max_new_tokens", "2048", input="What is the capital of France?\n/exit\n", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.split(">>> ")[1]
    # a short factual question (a long answer costs CI half a minute): the model ends its turn by itself
    assert "Paris" in answer and "[cut" not in answer and proc.stdout.count(">>> ") == 2
    assert "<|im_end|>" not in proc.stdout and "<|im_start|>" not in proc.stdout


def _default_sigint() -> None:
    """In the child: Ctrl-C handled as in a terminal, even when the tests run as a background job
    (a non-interactive shell starts those with SIGINT ignored, and a child inherits that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_in_a_subprocess_stops_the_answer_and_returns_to_the_prompt(tiny_qwen2_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "infer", "--model", str(tiny_qwen2_dir),
                             "--max_new_tokens", "4000", "--temperature", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, preexec_fn=_default_sigint)
    try:
        proc.stdin.write("Tell me a very long story.\n")
        proc.stdin.flush()
        seen = ""
        deadline = time.time() + 120
        while seen.count(">>> ") < 1 or len(seen.split(">>> ", 1)[1]) < 20:  # the answer is streaming
            seen += proc.stdout.read(1)
            assert time.time() < deadline, seen
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate("/exit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "[stopped]" in rest and rest.rstrip().endswith(">>>")


def test_sampling_defaults_come_from_the_models_generation_config():
    from transformers import GenerationConfig

    from lorakit.args import GenerationArgs
    from lorakit.infer.chat import sampling_params

    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    params, note = sampling_params(GenerationArgs(), qwen)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert note == ("from the model's generation_config.json: temperature 0.7, top_p 0.8, top_k 20, "
                    "repetition_penalty 1.05 (set --temperature 0 for exactly reproducible greedy answers)")
    params, note = sampling_params(GenerationArgs(temperature=0, repetition_penalty=1.2), qwen)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0, 0.8, 1.2)
    params, note = sampling_params(GenerationArgs(), GenerationConfig())  # a model that does not sample: greedy
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty, note) == (0.0, 1.0, 0, 1.0, None)


def test_system_pasted_with_template_markers_is_stripped_with_a_warning(tiny_qwen2_dir, capsys):
    from lorakit.args import AdapterArgs, InferArgs, ModelArgs
    from lorakit.infer.chat import load_session

    args = InferArgs(model=ModelArgs(model=str(tiny_qwen2_dir)),
                     adapter=AdapterArgs(system="<|im_start|>system\nBe brief.<|im_end|>"))
    assert load_session(args).system == "Be brief."
    assert "warning: --system held the chat template's own markers" in capsys.readouterr().err
