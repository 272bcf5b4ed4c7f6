"""What a run has done so far, read from the files it writes: its log, logging.jsonl, its checkpoints.

Nothing here talks to the training process: the page reads the same files a user could open, so a
run started from a terminal, or before the web UI restarted, shows the same way.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.webui.jobs import Job

# tqdm's bar of the training loop: "sft:  40%|####  | 4/10 [00:03<00:05, 1.2step/s, loss=...]"
_BAR = re.compile(r"^(sft|rlhf|dpo|grpo|[a-z]+po): +\d+%\|.*?\| *(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
_RUN_FOLDER = re.compile(r"^run folder: (.+)$", re.MULTILINE)
_STEPS = re.compile(r"^(\d+) optimizer steps", re.MULTILINE)
_STAGE = re.compile(r"^\[(\d+)/(\d+)\] (.+)$")


@dataclass
class Progress:
    """Where a training run stands."""

    run_dir: Path | None = None
    step: int = 0
    total: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    stage: str = ""
    "The last '[i/n] ...' line of quickstart, or ''."
    loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    reward: list[tuple[int, float]] = field(default_factory=list)
    eval_reward: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


def screen_lines(text: str) -> list[str]:
    """Log text as a terminal would show it: a progress bar's carriage returns keep only its last state."""
    return [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
            for line in text.split("\n")]


def tail(text: str, n: int = 30) -> str:
    """The last n screen lines of a log."""
    lines = [line for line in screen_lines(text)]
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines[-n:])


def _seconds(clock: str) -> float | None:
    if "?" in clock:
        return None
    parts = [float(p) for p in clock.split(":")]
    total = 0.0
    for p in parts:
        total = total * 60 + p
    return total


def read_log_records(run_dir: Path) -> list[dict]:
    """logging.jsonl of a run (a half-written last line, mid-append, is skipped)."""
    path = run_dir / "logging.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def total_steps_saved(run_dir: Path) -> int | None:
    """The planned steps of a run, from its newest checkpoint's trainer_state.json."""
    states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    try:
        return json.loads(states[-1].read_text(encoding="utf-8")).get("total_steps")
    except (OSError, json.JSONDecodeError):
        return None


def read_progress(log_text: str, run_dir: Path | None = None) -> Progress:
    """Progress from a job's log (the run folder, the plan, tqdm's bar) and the run's logging.jsonl."""
    p = Progress()
    found = _RUN_FOLDER.findall(log_text)
    p.run_dir = Path(found[-1].strip()) if found else run_dir
    planned = _STEPS.findall(log_text)
    p.total = int(planned[-1]) if planned else None
    chunk = log_text[-20000:].replace("\r", "\n")
    for line in chunk.split("\n"):
        bar = _BAR.match(line.strip())
        if bar:
            p.step, p.total = int(bar.group(2)), int(bar.group(3))
            p.elapsed_s, p.eta_s = _seconds(bar.group(4)), _seconds(bar.group(5))
        stage = _STAGE.match(line.strip())
        if stage:
            p.stage = line.strip()
    if p.run_dir is not None:
        records = read_log_records(p.run_dir)
        p.loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
        p.eval_loss = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        p.reward = [(r["step"], r["reward"]) for r in records if "reward" in r]
        p.eval_reward = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
        timed = [r for r in records if "elapsed_s" in r]
        if timed and timed[-1].get("step", 0) > p.step:  # a run with no log of ours (opened from its folder)
            p.step, p.elapsed_s = timed[-1]["step"], timed[-1]["elapsed_s"]
        if p.total is None:
            p.total = total_steps_saved(p.run_dir)
        if p.eta_s is None and p.elapsed_s and p.step and p.total:
            p.eta_s = p.elapsed_s / p.step * max(0, p.total - p.step)
    return p


def failure(job: Job) -> str | None:
    """Why a finished job did not succeed, in plain words; None when it succeeded or still runs."""
    if job.running:
        return None
    if job.ended is None and job.returncode is None:  # ended while no web UI process was watching it
        return None if _finished_log(job) else (
            "the process ended while no web UI was watching it; its exit status is unknown (see the log).")
    if job.returncode == 0:
        return None
    if job.stopped:
        return "stopped from the page."
    message = error_line(job.log())
    if job.returncode is not None and job.returncode < 0:
        name = signal.Signals(-job.returncode).name
        why = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"the process was killed by {name}{why}." + (f" Last error: {message}" if message else "")
    return message or f"the process exited with status {job.returncode}; the log below has the details."


def _finished_log(job: Job) -> bool:
    return "Training finished" in job.log() or "results: " in job.log()


def error_line(log_text: str) -> str:
    """The CLI's 'error: ...' message, else the last line of a Python traceback, else ''."""
    lines = [line.strip() for line in screen_lines(log_text) if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:  # the CLI's message runs to the end of the output (some name the rows at fault on their own lines)
        return "\n".join(lines[starts[-1]:starts[-1] + 12]).removeprefix("error: ")
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        for line in reversed(lines):
            if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
                return line
    return ""


@dataclass
class RunInfo:
    """A run folder found on disk."""

    path: Path
    command: str
    steps: int
    last_loss: float | None
    checkpoints: list[Path]

    def label(self) -> str:
        loss = f", loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        return f"{self.path.name} ({self.command}, {self.steps} steps{loss})"


def list_runs(output_dir: Path) -> list[RunInfo]:
    """Run folders (vN-YYYYMMDD-HHMMSS with args.json) under output_dir, newest first."""
    if not output_dir.is_dir():
        return []
    runs = []
    for folder in output_dir.iterdir():
        named = re.fullmatch(r"v\d+-\d{8}-\d{6}", folder.name)
        if not (named and folder.is_dir() and (folder / "args.json").is_file()):
            continue
        records = read_log_records(folder)
        losses = [r["loss"] for r in records if "loss" in r]
        steps = max((r.get("step", 0) for r in records), default=0)
        checkpoints = sorted((c for c in folder.glob("checkpoint-*") if c.is_dir() and c.name[11:].isdigit()),
                             key=lambda c: int(c.name[11:]))
        kind = "quickstart" if (folder / "report.json").is_file() else "sft"
        runs.append(RunInfo(folder, kind, steps, losses[-1] if losses else None, checkpoints))
    return sorted(runs, key=lambda r: r.path.stat().st_mtime, reverse=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every checkpoint of every run under output_dir, newest run first."""
    return [c for run in list_runs(output_dir) for c in reversed(run.checkpoints)]
