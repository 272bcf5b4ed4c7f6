"""What every tab shares: the page's context and how a job's state is shown (status line, progress bar)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import gradio as gr

from lorakit.webui.jobs import Job, JobRunner
from lorakit.webui.labels import Labels
from lorakit.webui.progress import Progress, failure

CSS = """
.lk-progress { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.lk-progress > div { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.lk-progress-text { font-size: 0.9em; margin-top: 4px; }
.lk-error p, .lk-error { color: var(--error-text-color, #b91c1c) !important; font-size: 0.9em; }
.lk-failed { border-left: 4px solid #dc2626; padding-left: 8px; }
.lk-ok { border-left: 4px solid #16a34a; padding-left: 8px; }
.lk-busy { border-left: 4px solid #2563eb; padding-left: 8px; }
"""


@dataclass
class Context:
    """What the tabs work with: the job runner, where runs go, and the labels."""

    runner: JobRunner
    output_dir: Path
    cwd: Path
    t: Labels


def failed_box(message: object) -> str:
    """A message in the page's red-edged failure box (Markdown inside)."""
    return f'<div class="lk-failed">\n\n{message}\n\n</div>'


def stop_job(ctx: Context, kind: str | None = None) -> str:
    """Stop the running job (only one of `kind` when given); the line to show."""
    job = ctx.runner.active()
    if job is None or (kind is not None and job.kind != kind):
        return ctx.t("nothing_running")
    ctx.runner.stop(job)
    return ctx.t("stop_sent")


def clock(seconds: float | None) -> str:
    """1:02:03 / 02:03; '?' when unknown."""
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def state_of(job: Job) -> str:
    """running, finished, stopped or failed."""
    if job.running:
        return "running"
    if failure(job) is None:
        return "finished"
    return "stopped" if job.stopped else "failed"


def status_markdown(job: Job | None, t: Labels, *, extra: str = "") -> str:
    """'**Running** `lorakit sft ...` (started 08:12:03)' or the failure in plain words."""
    if job is None:
        return t("idle")
    state = state_of(job)
    started = t("started_at", time=datetime.fromtimestamp(job.started).strftime("%H:%M:%S"))
    took = f", {clock((job.ended or job.started) - job.started)}" if job.ended else ""
    lines = [f"**{t(state)}** ({started}{took})"]
    if state in ("failed", "stopped"):
        lines.append(html.escape(failure(job)).replace("\n", "<br>"))
    if extra:
        lines.append(extra)
    css = {"running": "lk-busy", "finished": "lk-ok"}.get(state, "lk-failed")
    body = "\n\n".join(lines)
    return f'<div class="{css}">\n\n{body}\n\n</div>'


def progress_html(p: Progress | None, t: Labels) -> str:
    """A bar and 'step 4 / 10 · elapsed 00:03 · ETA 00:05'."""
    if p is None:
        return ""
    width = 100 * p.fraction
    parts = []
    if p.total:
        parts.append(t("step_of", step=p.step, total=p.total))
    if p.elapsed_s is not None:
        parts.append(t("elapsed", time=clock(p.elapsed_s)))
    if p.eta_s is not None and p.step < (p.total or 0):
        parts.append(t("eta", time=clock(p.eta_s)))
    if p.loss:
        parts.append(t("loss_points", n=len(p.loss), loss=p.loss[-1][1]))
    if p.stage:
        parts.append(p.stage)
    text = html.escape(" · ".join(parts))
    return (f'<div class="lk-progress" data-fraction="{p.fraction:.3f}"><div style="width:{width:.1f}%"></div></div>'
            f'<div class="lk-progress-text">{text}</div>')


def error_markdown(message: str | None) -> dict:
    """The update for a field's error line: the CLI's message in red, or hidden."""
    return gr.update(value=f"⚠ {message}" if message else "", visible=bool(message))
