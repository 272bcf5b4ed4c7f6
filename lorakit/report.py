"""The quickstart/eval report: a terminal table, report.md, report.json and report.png."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.eval.results import EvalResult

# (key in EvalResult.figures(), row label, is it a share shown as a percentage)
ROWS = (
    ("identity_en", "identity, English (held-out probes)", True),
    ("identity_zh", "identity, Chinese (held-out probes)", True),
    ("retention", "retention (base-correct answers kept)", True),
    ("leak", "identity leak into general answers", True),
    ("drift_kl", "drift: mean per-token KL vs base", False),
)
# The acceptance bars: (at least or at most, value); a figure exactly at its bar meets it.
TARGETS = {"identity_en": (">=", 0.9), "identity_zh": (">=", 0.9), "retention": (">=", 0.9),
           "leak": ("<=", 0.05)}
LANGUAGES = (("en", "English"), ("zh", "Chinese"))


def system_title(entry: dict[str, Any]) -> str:
    """How a per-system-prompt entry of figures()["systems"] is named: "system 'X' (held out)"."""
    shown = "(template default)" if entry["system"] is None else repr(entry["system"])
    return f"system {shown} ({entry['label']})"


def target_text(key: str, missed: bool = False) -> str:
    """'>= 90%' (or, for a miss, what the figure was instead: '< 90%'); '' for a figure without a bar."""
    if key not in TARGETS:
        return ""
    sign, bar = TARGETS[key]
    if missed:
        sign = "<" if sign == ">=" else ">"
    return f"{sign} {100 * bar:g}%"


def misses(key: str, value: float | None) -> bool:
    """Whether `value` misses the bar of `key` (no value: nothing to judge)."""
    if value is None:
        return False
    sign, bar = TARGETS[key]
    return value < bar if sign == ">=" else value > bar


def missed_targets(result: EvalResult, examples: int = 2) -> list[str]:
    """One line per target the result misses: the figure, the replies behind it, and what to try.

    A small model lands near its bars and a different seed moves each figure by a probe or two
    (experiments/quickstart-recipe.md: about 6 runs in 10 of SmolLM2-135M pass all four), so the advice starts there.
    """
    lines = []

    def shown(rows, question, reply):
        return "; ".join(f"{question(r)!r} -> {reply(r)[:80]!r}" for r in rows[:examples])

    under = [("", result.identity, result.probes)] + [
        (f" under {system_title(s.figures())}", s.identity, s.probes) for s in result.other_systems]
    for where, identity, probes in under:
        for lang, language in LANGUAGES:
            key, share = f"identity_{lang}", identity.get(lang)
            if misses(key, share):
                failed = [p for p in probes if p.lang == lang and not p.passed]
                lines.append(f"identity ({language}){where} {100 * share:.1f}% {target_text(key, missed=True)}: "
                             f"{len(failed)} probes did not state both name and author, e.g. "
                             f"{shown(failed, lambda p: p.query, lambda p: p.reply)}. Try another --seed, "
                             f"or train longer (--num_train_epochs 2) or harder (a higher --learning_rate).")
    def retention_line(where: str, retention: float, rows, base_correct: int, which: str, advice: str) -> str:
        lost = [r for r in rows if r.base_correct and not r.correct]
        return (f"retention{where} {100 * retention:.1f}% {target_text('retention', missed=True)}: {len(lost)} of the "
                f"{base_correct} general questions the base got right {which}, e.g. "
                f"{shown(lost, lambda r: r.question, lambda r: r.reply)}. {advice}")

    if misses("retention", result.retention):
        lines.append(retention_line("", result.retention, result.retention_rows, result.base_correct,
                                    "are now wrong", "Try another --seed (at this model size the figure moves by a "
                                    "question or two between seeds) or a lower --learning_rate, which trades "
                                    "identity for it."))
    if misses("leak", result.leak):
        leaked = [r for r in result.retention_rows if r.leaked]
        lines.append(f"identity leak {100 * result.leak:.1f}% {target_text('leak', missed=True)}: {len(leaked)} "
                     f"general answers state the new identity, e.g. "
                     f"{shown(leaked, lambda r: r.question, lambda r: r.reply)}. Try another --seed, "
                     f"a higher --replay_weight_zh if the answers are Chinese, or add general rows of your own "
                     f"with --dataset.")
    for s in result.other_systems:
        if misses("leak", s.leak):
            lines.append(f"identity leak under {system_title(s.figures())} {100 * s.leak:.1f}% "
                         f"{target_text('leak', missed=True)}: general answers under this system prompt state the "
                         f"new identity. Try another --seed or a higher --replay_weight.")
        if misses("retention", s.retention):
            lines.append(retention_line(f" under {system_title(s.figures())}", s.retention, s.retention_rows,
                                        s.base_correct, "(under the run's own prompt) are wrong under this one",
                                        "Try another --seed or a lower --learning_rate."))
    return lines


def print_missed(lines: list[str]) -> None:
    for line in lines:
        print(f"missed: {line}")


def fmt(value: float | None, percent: bool) -> str:
    """'93.8%' for shares, '0.0123' for KL, '-' when missing."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"


def cell(figures: dict[str, Any], key: str, percent: bool) -> str:
    """fmt, plus the counts behind an identity share: '93.8% (30/32)'."""
    text = fmt(figures.get(key), percent)
    lang = key.removeprefix("identity_")
    if key.startswith("identity_") and figures.get(f"probes_{lang}"):
        text += f" ({figures[f'passed_{lang}']}/{figures[f'probes_{lang}']})"
    return text


def figures_table(before: dict[str, Any] | None, after: dict[str, Any], *, markdown: bool = False) -> str:
    """Before/after table of the headline figures (plain text for the terminal, or markdown)."""
    header = ["", "before", "after", "target"] if before is not None else ["", "value", "target"]
    body = []
    for key, label, percent in ROWS:
        cells = [label] + ([cell(before, key, percent)] if before is not None else [])
        body.append(cells + [cell(after, key, percent), target_text(key)])
    for entry in after.get("systems", [])[1:]:  # the run's own system prompt is the rows above
        then = next((b for b in (before or {}).get("systems", []) if b["system"] == entry["system"]), {})
        rows = [(f"identity_{lang}", f"identity, {language}, {system_title(entry)}") for lang, language in LANGUAGES]
        rows += [("leak", f"identity leak, {system_title(entry)}"), ("retention", f"retention, {system_title(entry)}")]
        for key, label in rows:
            if entry.get(key) is None:  # not asked (a base model under another prompt)
                continue
            cells = [label] + ([cell(then, key, True)] if before is not None else [])
            body.append(cells + [cell(entry, key, True), target_text(key)])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + body)


@dataclass
class Report:
    """Everything quickstart writes into the run folder."""

    model: str
    name: list[str]
    author: list[str]
    checkpoint: str
    infer_command: str
    before: dict[str, Any]
    after: dict[str, Any]
    recipe: dict[str, Any]
    timings: dict[str, float]
    data: dict[str, Any] = field(default_factory=dict)
    baseline_answers: list[dict[str, str]] = field(default_factory=list)
    after_answers: list[dict[str, str]] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    "One line per missed target: the figure, example replies, what to try (missed_targets)."
    retention_lost: list[dict[str, str]] = field(default_factory=list)
    "General questions the base answered correctly and the tuned model no longer does: question, base_reply, reply."


def plain(value: Any) -> str:
    """A recipe or timing value as a person reads it: 3 significant digits, dicts and lists spelled out."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value) or "-"
    return str(value)


def scoring_note(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Say how many probes each column was scored on when the two differ."""
    counts = [(before.get(f"probes_{lang}"), after.get(f"probes_{lang}")) for lang in ("en", "zh")]
    if all(b == a for b, a in counts):
        return ""
    b = " + ".join(str(x[0]) for x in counts)
    a = " + ".join(str(x[1]) for x in counts)
    return (f"Identity before training is scored on a sample of {b} (English + Chinese) probes, since the base "
            f"model cannot know its new name; after training on all {a}. Retention, leak and drift use the same "
            f"questions before and after.")


def write_report(report: Report, run_dir: Path) -> list[Path]:
    """report.json, report.md and report.png in `run_dir`; returns the paths written."""
    run_dir = Path(run_dir)
    paths = [run_dir / "report.json", run_dir / "report.md"]
    paths[0].write_text(json.dumps(report.__dict__, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(report_markdown(report), encoding="utf-8")
    png = draw_report_png(report, run_dir / "report.png")
    return paths + ([png] if png else [])


def report_markdown(report: Report) -> str:
    """The human-readable report."""
    lines = [
        f"# lorakit quickstart: {' / '.join(report.name)} by {' / '.join(report.author)}",
        "",
        f"Base model: `{report.model}`  ",
        f"Checkpoint: `{report.checkpoint}`",
        "",
        figures_table(report.before, report.after, markdown=True),
        "",
    ]
    note = scoring_note(report.before, report.after)
    if note:
        lines += [note, ""]
    systems = report.after.get("systems", [])
    if len(systems) > 1:
        own = "the chat template's default" if systems[0]["system"] is None else repr(systems[0]["system"])
        lines += [f"The rows without a system prompt named are measured under the run's own, {own}; drift is "
                  "measured there only. A deployment sets its own system prompt, so identity, leak and retention "
                  "are also scored under others (retention under each counts the general questions the base answered "
                  "correctly under the run's own prompt, as replay teaches the model to answer them under every "
                  "prompt): a \"held out\" prompt is in no training row (the "
                  "built-in identity and replay rows are spread over lorakit/data/system_prompts.py's "
                  "TRAINING_SYSTEMS).", ""]
    if report.missed:
        lines += ["## Missed targets", ""] + [f"- {line}" for line in report.missed] + [""]
    lines += [
        "Identity is scored on held-out probes (questions phrased unlike any training row): a reply passes "
        "when it states the new name and the new author and claims no other identity. Retention is the share "
        "of general questions the base model answered correctly that the tuned model still answers correctly.",
        "",
        "## Chat with it",
        "",
        f"```\n{report.infer_command}\n```",
        "",
        "## Training recipe",
        "",
    ]
    lines += [f"- {k}: {plain(v)}" for k, v in report.recipe.items()]
    lines += ["", "## Time", ""] + [f"- {k}: {v:.1f} s" for k, v in report.timings.items()]
    if report.retention_lost:
        lines += ["", f"## Retention: the {len(report.retention_lost)} general answers that got worse", ""]
        lines += [f"- **{r['question']}**  \n  before: {r['base_reply']}  \n  after: {r['reply']}"
                  for r in report.retention_lost]
    for title, answers in (("Before (base model)", report.baseline_answers), ("After", report.after_answers)):
        if answers:
            lines += ["", f"## {title}", ""]
            lines += [f"- **{a['query']}**" + (f" ({a['system']})" if "system" in a else "") +
                      f"  \n  {a['reply']}" for a in answers]
    lines += ["", "![loss and before/after](report.png)", ""]
    return "\n".join(lines)


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), debiased so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def draw_report_png(report: Report, out_path: Path) -> Path | None:
    """Loss curve (left) and before/after bars (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report.after.get("systems", [])
    fig, axes = plt.subplots(1, 3 if len(systems) > 1 else 2, figsize=(16 if len(systems) > 1 else 11, 4))
    left, right = axes[0], axes[1]
    steps = [(r["step"], r["loss"]) for r in report.log_history if "loss" in r]
    if steps:
        xs, ys = zip(*steps)
        left.plot(xs, ys, alpha=0.3, color="tab:blue", label="train loss")
        left.plot(xs, smoothed(list(ys)), color="tab:blue", label="smoothed (EMA 0.8)")
        left.legend()
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.set_title("training loss")
    left.grid(alpha=0.3)
    keys = [(k, label.split(" (")[0]) for k, label, percent in ROWS if percent]
    xs = range(len(keys))
    before = [100 * (report.before.get(k) or 0.0) for k, _ in keys]
    after = [100 * (report.after.get(k) or 0.0) for k, _ in keys]
    right.bar([x - 0.2 for x in xs], before, width=0.4, label="before")
    right.bar([x + 0.2 for x in xs], after, width=0.4, label="after")
    for x, (key, _) in zip(xs, keys):  # each figure's bar: a dashed line across its pair of bars
        if key in TARGETS:
            right.hlines(100 * TARGETS[key][1], x - 0.45, x + 0.45, colors="black", linestyles="dashed",
                         label="target" if x == 0 else None)
    right.set_xticks(list(xs), [label for _, label in keys], rotation=15, fontsize=8)
    right.set_ylim(0, 105)
    right.set_ylabel("%")
    right.set_title("before / after")
    right.legend()
    if len(systems) > 1:
        draw_system_bars(axes[2], systems)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def draw_system_bars(ax, systems: list[dict[str, Any]]) -> None:
    """Identity after training per system prompt: English and Chinese bars, the target as a dashed line."""
    xs = range(len(systems))
    for offset, (lang, language) in zip((-0.2, 0.2), LANGUAGES):
        ax.bar([x + offset for x in xs], [100 * (s.get(f"identity_{lang}") or 0.0) for s in systems], width=0.4,
               label=language)
    ax.axhline(100 * TARGETS["identity_en"][1], color="black", linestyle="dashed", label="target")
    names = [f"{png_text(s['system'])}\n({s['label']})" for s in systems]
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title("identity after training, per system prompt")
    ax.legend(fontsize=7, loc="lower right")


def png_text(system: str | None) -> str:
    """A system prompt as the plot can draw it: Matplotlib's default font has no Chinese glyphs."""
    if system is None:
        return "(template default)"
    short = system if len(system) <= 24 else system[:22] + "..."
    return short if short.isascii() else "(text in report.md)"
