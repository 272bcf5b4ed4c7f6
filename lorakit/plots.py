"""images/loss.png: train and eval loss against the optimizer step (and, for preference training, the rewards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "eval_rewards/margins")


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

    rewards = {key: [(r["step"], r[key]) for r in log_history if key in r] for key in REWARD_KEYS}
    rewards = {key: points for key, points in rewards.items() if points}
    if rewards:  # preference training: a second panel with TRL's reward curves
        fig, (ax, rax) = plt.subplots(1, 2, figsize=(12, 4))
        for key, points in rewards.items():
            rax.plot(*zip(*points), label=key, linestyle="--" if key.startswith("eval_") else "-")
        rax.set_xlabel("optimizer step")
        rax.set_ylabel("implicit reward (beta x log-ratio)")
        rax.axhline(0, color="grey", linewidth=0.5)
        rax.grid(alpha=0.3)
        rax.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per pair)" if rewards else "loss (per loss token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
