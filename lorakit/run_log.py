"""A run folder's records: args.json, logging.jsonl, TensorBoard, wandb and images/loss.png.

The loop hands every record to `RunLog.record`; where records go is decided here, once, so the loop
does no file I/O of its own besides checkpoints.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from lorakit.plots import plot_loss


def new_run_dir(output_dir: str, add_version: bool) -> Path:
    """output_dir/vN-YYYYMMDD-HHMMSS (N one past the highest existing), or output_dir itself."""
    root = Path(output_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not add_version:
        return root
    taken = [int(p.name[1:].split("-")[0]) for p in root.glob("v*-*") if p.name[1:].split("-")[0].isdigit()]
    run = root / f"v{max(taken, default=-1) + 1}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run.mkdir()
    return run


class RunLog:
    """The records of one run: in memory (`history`), in logging.jsonl, and in TensorBoard/wandb when asked for.

    Creating it writes args.json; `close()` closes the writers and draws images/loss.png. With
    writes=False (the processes other than rank 0 of a distributed run) it keeps the history only.
    """

    def __init__(self, run_dir: Path, saved_args: dict[str, Any], *, writes: bool = True):
        self.run_dir = run_dir
        self.saved_args = saved_args
        self.history: list[dict[str, Any]] = []
        self.writes = writes
        self._tensorboard: Any = None
        self._wandb = False
        if writes:
            (run_dir / "args.json").write_text(json.dumps(saved_args, indent=2, ensure_ascii=False, default=str) + "\n")

    @classmethod
    def create(cls, output_dir: str, add_version: bool, saved_args: dict[str, Any]) -> RunLog:
        """A new run folder under output_dir (see new_run_dir) with its args.json."""
        return cls(new_run_dir(output_dir, add_version), saved_args)

    def open_writers(self, report_to: list[str]) -> None:
        """Start TensorBoard and/or wandb when asked for and installed (logging.jsonl is always written)."""
        if not self.writes:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "runs"))
            except ImportError:
                print("notice: --report_to tensorboard, but tensorboard is not installed (pip install tensorboard); "
                      "logging.jsonl still has every value.", file=sys.stderr)
        if "wandb" in report_to:
            try:
                import wandb

                wandb.init(project="lorakit", name=self.run_dir.name, dir=str(self.run_dir), config=self.saved_args)
                self._wandb = True
            except Exception as exc:  # missing package or no login: the run goes on, logging.jsonl has it all
                print(f"notice: --report_to wandb failed ({type(exc).__name__}: {exc}); continuing without it.",
                      file=sys.stderr)

    def record(self, record: dict[str, Any]) -> None:
        """Append one record (a dict with 'step') to the history, logging.jsonl, TensorBoard and wandb."""
        self.history.append(record)
        if not self.writes:
            return
        with open(self.run_dir / "logging.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(("eval/" if key.startswith("eval") else "train/") + key, value,
                                             record["step"])
        if self._wandb:
            import wandb

            if wandb.run is not None:
                wandb.log(scalars, step=record["step"])

    def last(self, key: str) -> Any:
        """The latest value of `key` in the history (None when never logged)."""
        return next((r[key] for r in reversed(self.history) if key in r), None)

    def close(self) -> None:
        """Close the writers and draw images/loss.png from the history."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self.writes:
            plot_loss(self.history, self.run_dir / "images" / "loss.png")
