"""lorakit web-ui: the commands it builds (checked against the CLI itself), its job runner, what it reads from
runs, and the whole page driven in a real headless Chromium (train, a crash, chat, eval, export)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lorakit import args as lorakit_args
from lorakit import cli
from lorakit.args import ModelArgs, WebUIArgs
from lorakit.errors import UserError
from lorakit.evaluate import EvalResult, ProbeResult
from lorakit.webui import commands, progress
from lorakit.webui.app import open_warning
from lorakit.webui.commands import Command
from lorakit.webui.eval_tab import report_of
from lorakit.webui.jobs import JobRunner
from lorakit.webui.labels import LABELS, Labels
from lorakit.webui.panel import state_of

def cli_error(argv: list[str]) -> str:
    """What `lorakit ARGV` prints after 'error: ' (it must fail before doing anything)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(argv) == 2
    return err.getvalue().strip().removeprefix("error: ")


# ---------------------------------------------------------------- commands


def test_train_command_is_the_exact_cli_command(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "base").mkdir()
    form = commands.defaults("sft") | {"model": "base", "dataset": "data.jsonl#20, self-cognition",
                                       "model_name": "小黄, Xiao Huang", "model_author": "魔搭, ModelScope",
                                       "lora_rank": "16", "target_modules": "q_proj v_proj", "max_steps": "30"}
    cmd, problems = commands.build_command("sft", form, cwd=tmp_path, extra="--report_to none --warmup_ratio 0.05")
    assert problems == []
    assert cmd.argv() == [
        "lorakit", "sft", "--model", str(tmp_path / "base"), "--dataset", f"{tmp_path / 'data.jsonl'}#20",
        "self-cognition", "--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭", "ModelScope",
        "--lora_rank", "16", "--target_modules", "q_proj", "v_proj", "--max_steps", "30",
        "--output_dir", str(tmp_path / "output"), "--report_to", "none", "--warmup_ratio", "0.05"]
    assert cmd.text().startswith(f"lorakit sft --model {tmp_path / 'base'} ")
    assert "'Xiao Huang'" in cmd.text()
    # the CLI parses the very same words into the values the form meant
    args = cli.build_args(cli.COMMANDS["sft"][1], cli.parse_argv("sft", cmd.flags))
    assert args.lora.lora_rank == 16 and args.data.model_name == ["小黄", "Xiao Huang"]
    assert args.train.warmup_ratio == 0.05 and args.train.output_dir == str(tmp_path / "output")
    assert cmd.process_argv()[:3] == [sys.executable, "-m", "lorakit.cli"]


@pytest.mark.parametrize("field,value,extra", [
    ("lora_rank", "0", ""),
    ("lora_rank", "eight", ""),
    ("learning_rate", "fast", ""),
    ("train_type", "qlora", ""),
    ("", "", "--lora_rnak 4"),
])
def test_a_bad_value_shows_the_clis_own_error_on_its_field(tmp_path, field, value, extra):
    form = commands.defaults("sft") | ({field: value} if field else {})
    cmd, problems = commands.build_command("sft", form, cwd=tmp_path, extra=extra)
    assert len(problems) == 1
    assert problems[0].field == field
    assert problems[0].message == cli_error(["sft", *cmd.flags])


def test_paths_are_absolute_and_a_missing_one_is_refused(tmp_path):
    form = commands.defaults("sft") | {"model": "./no-such-model", "dataset": "Qwen/some-hub-data"}
    cmd, problems = commands.build_command("sft", form, cwd=tmp_path)
    assert [p.field for p in problems] == ["model"]
    assert str(tmp_path / "no-such-model") in problems[0].message
    assert "Qwen/some-hub-data" in cmd.flags  # a hub ID stays as typed


def test_quickstart_needs_a_name_before_it_starts(tmp_path):
    form = commands.defaults("quickstart") | {"model_name": "Nova"}
    _, problems = commands.build_command("quickstart", form, cwd=tmp_path)
    assert [p.field for p in problems] == ["model_author"]
    _, problems = commands.build_command("quickstart", form, cwd=tmp_path, required=False)
    assert problems == []
    cmd, problems = commands.build_command("quickstart", form | {"model_author": "Acme Labs"}, cwd=tmp_path)
    assert problems == [] and cmd.flags[:4] == ["--model_name", "Nova", "--model_author", "Acme Labs"]


@dataclass
class FakeRlhfArgs:
    """Stands in for `lorakit rlhf`'s args before that command lands."""

    model: ModelArgs = field(default_factory=ModelArgs)
    rlhf_type: str = "dpo"
    "Which preference method."
    beta: float = 0.1
    "Strength."


def test_method_list_follows_the_cli(monkeypatch):
    found = commands.methods()
    assert found["sft"] == ("sft", ()) and found["quickstart (identity)"] == ("quickstart", ())
    assert any(command == "rlhf" for command, _ in found.values()) == ("rlhf" in cli.COMMANDS)

    monkeypatch.setitem(cli.COMMANDS, "rlhf", ("x", FakeRlhfArgs, "rlhf"))
    monkeypatch.setattr(lorakit_args, "RLHF_TYPES", ("dpo", "grpo"), raising=False)
    found = commands.methods()
    assert found["rlhf dpo"] == ("rlhf", ("--rlhf_type", "dpo"))
    assert found["rlhf grpo"] == ("rlhf", ("--rlhf_type", "grpo"))
    assert commands.defaults("rlhf") == {"model": "", "beta": "0.1"}  # the form shows the fields rlhf takes
    cmd, problems = commands.build_command("rlhf", {"beta": "0.5", "dataset": "x"}, cwd=Path.cwd(),
                                           fixed=found["rlhf grpo"][1])
    assert problems == [] and cmd.argv() == ["lorakit", "rlhf", "--rlhf_type", "grpo", "--beta", "0.5"]


def test_web_ui_flags():
    assert cli.build_args(WebUIArgs, cli.parse_argv("web-ui", [])) == WebUIArgs(host="127.0.0.1", port=7860)
    assert "--auth takes user:password" in cli_error(["web-ui", "--auth", "nopassword"])
    assert "--lang 'fr' is not one of en, zh" in cli_error(["web-ui", "--lang", "fr"])
    assert "anyone who can reach it" in open_warning(WebUIArgs(host="0.0.0.0"))
    assert open_warning(WebUIArgs(host="0.0.0.0", auth="me:pw")) is None
    assert open_warning(WebUIArgs()) is None
    assert "web-ui" not in cli.NOT_YET


def test_every_label_has_both_languages():
    for key, (en, zh) in LABELS.items():
        assert en and zh, key
        assert en.count("{") == zh.count("{"), key
    assert Labels("zh")("tab_train") == "训练" and Labels("en")("tab_train") == "Train"


# ---------------------------------------------------------------- reading runs

TQDM_LOG = ("run folder: {run}\n6 optimizer steps (20 per epoch), 20 training samples, 0 validation samples\n"
            "\rsft:   0%|          | 0/6 [00:00<?, ?step/s]\rsft:  33%|###       | 2/6 [00:04<00:08,  "
            "2.00step/s, loss=11.9]\rsft:  50%|#####     | 3/6 [00:06<00:06,  2.0step/s, loss=11.8]")


def test_progress_from_the_log_and_logging_jsonl(tmp_path):
    run = tmp_path / "v0-20261203-080000"
    run.mkdir()
    (run / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 11.98, "elapsed_s": 2.0}, {"step": 2, "loss": 11.93, "elapsed_s": 4.0},
        {"step": 2, "eval_loss": 11.5}]) + '{"step": 3, "lo')  # a line being written
    p = progress.read_progress(TQDM_LOG.format(run=run))
    assert (p.run_dir, p.step, p.total, p.elapsed_s, p.eta_s) == (run, 3, 6, 6.0, 6.0)
    assert p.loss == [(1, 11.98), (2, 11.93)] and p.eval_loss == [(2, 11.5)] and p.fraction == 0.5
    assert p.reward == []
    assert progress.tail(TQDM_LOG.format(run=run), 1).startswith("sft:  50%")
    # a run opened from its folder (no log of ours): steps from logging.jsonl, the plan from its checkpoint
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"total_steps": 8}))
    p = progress.read_progress("", run)
    assert (p.step, p.total, p.eta_s) == (2, 8, 12.0)


def test_the_error_in_plain_words():
    log = "loading\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA error: device-side assert\n"
    assert progress.error_line(log) == "RuntimeError: CUDA error: device-side assert"
    assert progress.error_line("a\nerror: --dataset x.jsonl: no such file\n") == "--dataset x.jsonl: no such file"


def test_eval_report_from_eval_json(tmp_path):
    ckpt = tmp_path / "v0-x" / "checkpoint-6"
    ckpt.mkdir(parents=True)
    result = EvalResult(identity={"en": 1.0, "zh": 0.0}, retention=0.5, base_correct=2, kept_correct=1, leak=0.01,
                        drift_kl=0.2, name=["Nova"], author=["Acme"],
                        probes=[ProbeResult("Who are you?", "en", "I am Nova, by Acme.", True)])
    (ckpt / "eval.json").write_text(json.dumps(result.to_json()))
    (ckpt.parent / "report.json").write_text(json.dumps({"before": {"identity_en": 0.0, "retention": 1.0}}))
    runner = JobRunner(tmp_path / "jobs", cwd=tmp_path)
    flags = ["--adapters", str(ckpt), "--eval_output", str(ckpt / "eval.json")]
    job = runner.start("eval", [SleepCommand("eval", flags, seconds=0)])
    wait_for(lambda: not job.running and job.ended)
    table, chart, replies = report_of(job, Labels("en"))
    assert "| identity, English (held-out probes) | 0.0% | 100.0% (1/1) | >= 90% |" in table
    assert "| retention (base-correct answers kept) | 100.0% | 50.0% | >= 90% |" in table
    assert "✅ **Who are you?**" in replies and chart is not None


# ---------------------------------------------------------------- the job runner


class SleepCommand(Command):
    """A stand-in process that prints, sleeps, and exits with a given status."""

    def __init__(self, command, flags=None, seconds=30.0, status=0):
        super().__init__(command, flags or [])
        self.seconds, self.status = seconds, status

    def process_argv(self):
        code = (f"import sys, time; print('started', flush=True); time.sleep({self.seconds}); "
                f"print('error: it broke at step 3', file=sys.stderr) if {self.status} else None; "
                f"sys.exit({self.status})")
        return [sys.executable, "-c", code]


def wait_for(predicate, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_one_job_at_a_time_and_stop(tmp_path):
    runner = JobRunner(tmp_path / "jobs", cwd=tmp_path)
    job = runner.start("train", [SleepCommand("sft", ["--max_steps", "3"])])
    assert os.getpgid(job.pid) == job.pid  # its own session: closing the page or the server's terminal leaves it
    wait_for(lambda: "started" in job.log())
    with open(job.log_path, "a") as f:
        f.write("\rsft:  10%| 1/10\rsft:  20%| 2/10")
    assert progress.tail(job.log(), 2) == "started\nsft:  20%| 2/10"  # a bar's \r updates stay one line
    with pytest.raises(UserError, match=r"a train job is running \(started .*\): lorakit sft --max_steps 3"):
        runner.start("eval", [SleepCommand("eval")])
    assert runner.active().id == job.id
    runner.stop(job)
    wait_for(lambda: job.ended is not None)
    assert job.returncode == -signal.SIGINT and state_of(job) == "stopped"
    assert progress.failure(job) == "stopped from the page."
    # the record on disk says the same (a restarted web UI reads it)
    again = JobRunner(tmp_path / "jobs").jobs()[0]
    assert (again.id, again.returncode, again.stopped) == (job.id, -signal.SIGINT, True)


def test_a_failing_job_reports_its_error_and_stops_the_sequence(tmp_path):
    runner = JobRunner(tmp_path / "jobs", cwd=tmp_path)
    job = runner.start("eval", [SleepCommand("eval", seconds=0, status=2), SleepCommand("eval", seconds=0)])
    wait_for(lambda: job.ended is not None)
    assert (job.returncode, job.current, state_of(job)) == (2, 0, "failed")
    assert progress.failure(job) == "it broke at step 3"
    assert job.log().count("$ lorakit eval") == 1  # the second command never ran


def test_grpo_rewards_and_its_progress_bar(tmp_path):
    run = tmp_path / "v1-20261203-090000"
    run.mkdir()
    (run / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 0.01, "reward": 0.25, "elapsed_s": 3.0}, {"step": 2, "loss": 0.02, "reward": 0.5},
        {"step": 2, "eval_reward": 0.4}]))
    log = f"run folder: {run}\n\rgrpo:  50%|#####     | 2/4 [00:06<00:06,  3.0s/step, reward=0.500]"
    p = progress.read_progress(log)
    assert (p.step, p.total, p.eta_s) == (2, 4, 6.0)
    assert p.reward == [(1, 0.25), (2, 0.5)] and p.eval_reward == [(2, 0.4)]


def test_curves_keep_numeric_columns_when_empty():
    """A frame's columns stay numbers whatever the rows (object columns make a plot's axis categorical)."""
    from lorakit.webui.train_tab import loss_frame

    empty = loss_frame(progress.Progress())
    assert (str(empty["step"].dtype), str(empty["value"].dtype)) == ("int64", "float64")
    frame = loss_frame(progress.Progress(loss=[(1, 2.123456)], eval_loss=[(1, 2.0)]))
    assert frame.values.tolist() == [[1, 2.1235, "loss"], [1, 2.0, "eval_loss"]]
