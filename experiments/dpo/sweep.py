"""One measured run of the habit acceptance: `lorakit rlhf` as a user types it, then check_habit.py.

Appends one JSON line to experiments/dpo/results.jsonl: the type, the extra flags, the command's wall
seconds and CPU seconds (on an idle 2-core machine the wall time is about half the CPU seconds; the
shared machine's load average around it is kept too), and check_habit.py's figures
(held-out reward accuracy, habit share, answered-after-habit share, `lorakit eval` retention).

    python experiments/dpo/sweep.py --rlhf_type dpo [--data examples/rlhf/habit_train.jsonl] -- --rpo_alpha 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "rlhf"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rlhf_type", default="dpo")
    parser.add_argument("--data", default=str(EXAMPLES / "habit_train.jsonl"))
    parser.add_argument("--test", default=str(EXAMPLES / "habit_test.jsonl"))
    parser.add_argument("--habit", default="Quick take:")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.jsonl")))
    parser.add_argument("--tag", default="")
    parser.add_argument("extra", nargs="*")
    opts = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        load_before = os.getloadavg()[0]
        started, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "rlhf", "--rlhf_type", opts.rlhf_type,
                               "--dataset", opts.data, "--output_dir", tmp, "--report_to", "none", *opts.extra],
                              env=env, capture_output=True, text=True)
        train_s = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        (run,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        ckpt = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        log = [json.loads(line) for line in (run / "logging.jsonl").open()]
        check = subprocess.run([sys.executable, str(EXAMPLES / "check_habit.py"), "--adapters", str(ckpt),
                                "--test", opts.test, "--habit", opts.habit], env=env, capture_output=True, text=True)
        if check.returncode != 0:
            sys.exit(check.stderr[-3000:])
    figures = json.loads(check.stdout)
    ref = [line for line in proc.stderr.splitlines() if "reference log-probs" in line]
    record = {"tag": opts.tag, "rlhf_type": opts.rlhf_type, "flags": opts.extra, "data": Path(opts.data).name,
              "train_s": round(train_s, 1), "train_cpu_s": round(cpu_s, 1),
              "load": [round(load_before, 1), round(load_after, 1)],
              "omp_threads": os.environ.get("OMP_NUM_THREADS"),
              "reference": ref[-1] if ref else None, "steps": log[-1].get("step") if log else None,
              "last_log": log[-1] if log else None, **figures}
    with open(opts.results, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(json.dumps(record, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
