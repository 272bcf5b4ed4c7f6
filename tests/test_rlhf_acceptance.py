"""The real SmolLM2-135M-Instruct learns a preference it never showed, on prompts it never saw.

examples/rlhf/habit_train.jsonl prefers the base model's own answers when they open with
"Quick take: "; after `lorakit rlhf --rlhf_type T` with every default, the held-out prompts
of habit_test.jsonl get the habit in most greedy answers (the base: none), each followed by a
real answer (no "Quick take: Quick take: ..." collapse), the held-out pairs are ranked right,
and `lorakit eval`'s retention of general answers stays >= 90% (check_habit.py measures all four).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli

EXAMPLES = ROOT / "examples" / "rlhf"
# Each case costs 2.5-4 minutes of a 2-core machine (train 2-3 min + the check), so none runs by default (the
# default suite stays under 20 minutes). LORAKIT_RUN_ACCEPTANCE=1 runs all five types, which pass at their defaults.
# Last measured: docs/rlhf.md ("Defaults and the habit acceptance"), every run in experiments/dpo/README.md.
RUN_PASSING = bool(os.environ.get("LORAKIT_RUN_ACCEPTANCE"))
PASSING = ("the habit acceptance at the defaults (2.5-4 min a type): measured 2026-12-04 after the one-forward layout, "
           "reward acc / habit / answered / retention / training s on 2 cores: dpo 1.0/97%/100%/91% (40/44)/183, "
           "orpo 1.0/95%/100%/91%/118, simpo 1.0/100%/92%/91%/120, cpo 1.0/100%/95%/91%/119, kto 1.0/100%/97%/91%/149; "
           "seeds 42 and 1 on 2026-12-03 alike (docs/rlhf.md). LORAKIT_RUN_ACCEPTANCE=1 runs it")


def case(rlhf_type: str):
    return pytest.param(rlhf_type, marks=pytest.mark.skipif(not RUN_PASSING, reason=PASSING))


@pytest.mark.slow
@pytest.mark.parametrize("rlhf_type", [case(t) for t in ("dpo", "orpo", "simpo", "cpo", "kto")])
def test_learns_the_habit_on_held_out_prompts(tmp_path, rlhf_type):
    out = tmp_path / "out"
    proc = run_cli("rlhf", "--rlhf_type", rlhf_type, "--dataset", str(EXAMPLES / "habit_train.jsonl"),
                   "--output_dir", str(out), "--report_to", "none", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    ckpt = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    check = subprocess.run([sys.executable, str(EXAMPLES / "check_habit.py"), "--adapters", str(ckpt)],
                           capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 0, check.stderr[-3000:]
    figures = json.loads(check.stdout)
    assert figures["habit_base"] <= 0.05, figures
    assert figures["habit_tuned"] >= 0.7, figures
    assert figures["answered_after_habit"] >= 0.9, figures
    assert figures["reward_accuracy"] >= 0.9, figures
    assert figures["retention"] >= 0.9, figures
