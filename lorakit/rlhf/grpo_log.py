"""What a GRPO run reports: per-round statistics (TRL's metric names), the zero-signal warning, the
completions file and the reward plot."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.rlhf.grpo_loss import Advantages, nanstd
from lorakit.rlhf.grpo_rollout import Rollout

ZERO_SIGNAL_SHARE = 0.5  # warn when more than this share of groups taught nothing ...
ZERO_SIGNAL_ROUNDS = 3  # ... for this many rounds in a row


def round_metrics(names: list[str], weights: torch.Tensor, rewards: torch.Tensor, adv: Advantages,
                  rollouts: list[Rollout]) -> dict[str, float]:
    """Reward mean/std per function and in all, zero-signal share, completion lengths and truncation."""
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        column = rewards[:, j]
        if torch.isnan(column).all():
            continue
        out[f"rewards/{name}/mean"] = float(torch.nanmean(column))
        out[f"rewards/{name}/std"] = _finite(nanstd(column))
    total = (rewards * weights.to(rewards).unsqueeze(0)).nansum(dim=1)
    out["reward"] = float(total.mean())
    out["reward_std"] = _finite(total.std()) if total.numel() > 1 else 0.0
    out["frac_reward_zero_std"] = adv.zero_signal_groups / max(adv.groups, 1)
    lengths = [len(r.completion_ids) for r in rollouts]
    out["completions/mean_length"] = sum(lengths) / len(lengths)
    out["completions/min_length"] = float(min(lengths))
    out["completions/max_length"] = float(max(lengths))
    out["completions/clipped_ratio"] = sum(r.truncated for r in rollouts) / len(rollouts)
    return out


def _finite(x: torch.Tensor) -> float:
    value = float(x)
    return value if math.isfinite(value) else 0.0


def merge_window(records: list[dict[str, float]]) -> dict[str, float]:
    """One record for several rounds: means, except min/max lengths (min and max) and times (sums)."""
    out: dict[str, float] = {}
    for key in {k for r in records for k in r}:
        values = [r[key] for r in records if key in r]
        if key.endswith("min_length"):
            out[key] = min(values)
        elif key.endswith("max_length"):
            out[key] = max(values)
        elif key.startswith("time/"):
            out[key] = round(sum(values), 3)
        else:
            out[key] = sum(values) / len(values)
    return out


@dataclass
class ZeroSignalWatch:
    """Counts rounds in a row where most groups had one reward for every completion, and says what to change."""

    streak: int = 0
    warned_at: list[int] = field(default_factory=list)

    def update(self, step: int, share: float, reward_mean: float, reward_min: float, reward_max: float) -> str | None:
        self.streak = self.streak + 1 if share > ZERO_SIGNAL_SHARE else 0
        if self.streak < ZERO_SIGNAL_ROUNDS or (self.warned_at and step - self.warned_at[-1] < 20):
            return None
        self.warned_at.append(step)
        if reward_max - reward_min < 1e-9 and reward_max <= 0:
            side = (f"the reward is {reward_max:g} for every completion: the model never earns it. Check a few "
                    "completions (--log_completions true) against what the reward function expects; give partial "
                    "credit (e.g. add --reward_funcs format, or a reward for being close); start from an SFT adapter "
                    "that already answers in the expected form (--adapters); raise --num_generations or "
                    "--temperature so some completion succeeds")
        elif reward_mean >= reward_max - 1e-9:
            side = ("every completion already earns the top reward: the task is too easy for this model; use "
                    "harder prompts or a stricter reward")
        else:
            side = ("the completions of a prompt all score alike: raise --num_generations or --temperature for more "
                    "varied completions, or make the reward finer-grained than right/wrong")
        return (f"warning: {share:.0%} of the prompt groups at step {step} (and {self.streak - 1} rounds before) gave "
                f"no learning signal: {side}.")


def write_completions(path: Path, step: int, prompts: list[str], rollouts: list[Rollout], names: list[str],
                      rewards: torch.Tensor, advantages: torch.Tensor) -> None:
    """Append one line per completion: step, prompt, completion, each reward, the advantage."""
    with open(path, "a", encoding="utf-8") as f:
        for i, ro in enumerate(rollouts):
            scores = {n: (None if math.isnan(v) else v) for n, v in zip(names, rewards[i].tolist())}
            f.write(json.dumps({"step": step, "prompt": prompts[ro.prompt], "completion": ro.text,
                                "rewards": scores, "advantage": round(float(advantages[i]), 4),
                                "truncated": ro.truncated}, ensure_ascii=False) + "\n")


def plot_rewards(log_history: list[dict[str, Any]], out_path: Path) -> Path | None:
    """images/reward.png: mean reward (and each function's) per step, held-out rewards (sampled, greedy) as markers."""
    train = [(r["step"], r["reward"]) for r in log_history if "reward" in r]
    evals = [(r["step"], r["eval_reward"]) for r in log_history if "eval_reward" in r]
    greedy = [(r["step"], r["eval_reward_greedy"]) for r in log_history if "eval_reward_greedy" in r]
    if not train and not evals:
        return None
    try:
        import matplotlib
    except ImportError:
        print("notice: matplotlib is not installed, so images/reward.png was not drawn.", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="reward (train rollouts)", linewidth=2)
    names = sorted({k.split("/")[1] for r in log_history for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if len(names) > 1:
        for name in names:
            points = [(r["step"], r[f"rewards/{name}/mean"]) for r in log_history if f"rewards/{name}/mean" in r]
            ax.plot(*zip(*points), linestyle="--", alpha=0.7, label=name)
    if evals:
        ax.plot(*zip(*evals), marker="o", label="held-out reward (sampled)")
    if greedy:
        ax.plot(*zip(*greedy), marker="s", linestyle=":", label="held-out reward (greedy)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
