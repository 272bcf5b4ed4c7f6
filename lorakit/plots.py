"""images/loss.png: train and eval loss against the optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(log_history: list[dict[str, Any]], out_path: str | Path) -> Path | None:
    """Draw the train (and eval) loss curves of a run; None when there is nothing to draw."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    if not train and not evals:
        return None
    try:
        import matplotlib
    except ImportError:
        print("notice: matplotlib is not installed, so images/loss.png was not drawn (logging.jsonl has the losses).")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per loss token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
