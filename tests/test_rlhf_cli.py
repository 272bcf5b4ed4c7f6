"""`lorakit rlhf` run as a user runs it, on the tiny Qwen2: flags, dry run, every type trains and saves,
the SFT adapter as the starting policy and reference, exact resume, and the adapter reloads in infer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli as _run_cli
from lorakit.args import RlhfArgs, RlhfGroup
from lorakit.cli import build_args, parse_argv
from lorakit.errors import UserError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PAIRS = [("What is the capital of France?", "Paris.", "Lyon."), ("Name a colour.", "Blue.", "Seven."),
         ("What is 2+2?", "4.", "5."), ("Say hello.", "Hello!", "Goodbye."),
         ("Name a fruit.", "An apple.", "A chair."), ("What is ice?", "Frozen water.", "Hot air.")]


def run_cli(*args, **kwargs):
    return _run_cli(*args, env=ONE_THREAD, **kwargs)


def write_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def rlhf(model_dir, data, out, *extra):
    return run_cli("rlhf", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out),
                   "--lora_rank", "4", "--logging_steps", "1", "--learning_rate", "1e-3", "--report_to", "none", *extra)


@pytest.mark.parametrize("argv, message", [
    (["--rlhf_type", "orpo", "--loss_type", "hinge"], "--loss_type 'hinge' does not apply to --rlhf_type orpo"),
    (["--rlhf_type", "ppo"], "--rlhf_type 'ppo' is not one of"),
    (["--ref_model", "x"], "reference is always the starting policy"),
    (["--packing", "true"], "--packing does not apply to rlhf"),
    (["--loss_type", "exo_pair"], "exo_pair needs --label_smoothing > 0"),
    (["--label_smoothing", "0.5"], r"--label_smoothing must be in \[0, 0.5\)"),
    (["--rlhf_type", "kto", "--rpo_alpha", "1"], "--rpo_alpha applies to --rlhf_type dpo"),
])
def test_bad_flags_are_refused(argv, message):
    with pytest.raises(UserError, match=message):
        build_args(RlhfArgs, parse_argv("rlhf", argv))


def test_defaults_follow_ms_swift():
    assert (RlhfGroup().beta, RlhfGroup().loss_type) == (0.1, "sigmoid")
    assert (RlhfGroup(rlhf_type="simpo").beta, RlhfGroup(rlhf_type="simpo").loss_type) == (2.0, "simpo")
    assert RlhfGroup(rlhf_type="kto").loss_type == "kto" and RlhfGroup(rlhf_type="cpo").cpo_alpha == 1.0
    # DPO keeps the chosen answer likely unless told otherwise (--rpo_alpha 0: pure DPO); the others have no rpo
    assert RlhfGroup().rpo_alpha == 1.0 and RlhfGroup(rpo_alpha=0).rpo_alpha == 0
    assert RlhfGroup(rlhf_type="kto").rpo_alpha is None and RlhfGroup(rlhf_type="grpo").rpo_alpha is None


def test_dry_run_shows_both_sides_and_stops(tiny_qwen2_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    proc = rlhf(tiny_qwen2_dir, data, tmp_path / "out", "--dry_run", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "format: prompt/chosen/rejected (6 rows)" in proc.stderr
    assert "chosen:" in proc.stderr and "[[Paris.<|im_end|>]]" in proc.stderr and "[[Lyon.<|im_end|>]]" in proc.stderr
    assert not (tmp_path / "out").exists()
