"""The Eval tab: run `lorakit eval` on a checkpoint (and on its base, for the 'before' bars) and show the report."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
from matplotlib.figure import Figure

from lorakit.checkpoint import find_checkpoint
from lorakit.errors import UserError
from lorakit.loader import saved_args
from lorakit.report import ROWS, figures_table
from lorakit.webui import commands
from lorakit.webui.commands import Command, Problem
from lorakit.webui.jobs import Job
from lorakit.webui.panel import Context, error_markdown, failed_box, state_of, status_markdown, stop_job
from lorakit.webui.progress import list_checkpoints, tail


def checkpoint_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(f"{c.parent.name}/{c.name}", str(c)) for c in list_checkpoints(ctx.output_dir)]




def eval_commands(ctx: Context, spec: str, name: str, author: str,
                  base_too: bool) -> tuple[list[Command], list[Problem]]:
    """`lorakit eval` of the checkpoint, writing CKPT/eval.json; with base_too, then of its base (eval-base.json)."""
    try:
        ckpt = find_checkpoint(ctx.cwd / (spec or ""))
    except UserError as exc:
        return [], [Problem("checkpoint", str(exc))]
    form = {"adapters": str(ckpt), "model_name": name, "model_author": author, "eval_output": str(ckpt / "eval.json")}
    cmd, problems = commands.build_command("eval", form, cwd=ctx.cwd)
    found = [cmd]
    if base_too and not problems:
        saved = saved_args(ckpt)
        base_form = {"model": saved.model_path or "", "eval_output": str(ckpt / "eval-base.json"),
                     "model_name": name or ", ".join(saved.model_name),
                     "model_author": author or ", ".join(saved.model_author)}
        for key in ("model_name", "model_author"):
            if not base_form[key]:
                problems.append(Problem(key, f"the base model's eval needs --{key}: the checkpoint has none saved."))
        base_cmd, base_problems = commands.build_command("eval", base_form, cwd=ctx.cwd)
        found.append(base_cmd)
        problems += base_problems
    return found, problems


def output_of(argv: list[str]) -> Path | None:
    return Path(argv[argv.index("--eval_output") + 1]) if "--eval_output" in argv else None


def read_figures(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def before_figures(job: Job, after_path: Path) -> dict | None:
    """The base's figures: this job's base eval, else the quickstart report of the run the checkpoint came from."""
    if len(job.commands) > 1:
        base = read_figures(output_of(job.commands[1]))
        if base:
            return base["figures"]
    report = after_path.parent.parent / "report.json"
    if report.is_file():
        return json.loads(report.read_text(encoding="utf-8")).get("before")
    return None


def chart(before: dict | None, after: dict, t) -> Figure:
    """Bars of the percentage figures, before (if known) and after (a Figure without pyplot: no global state)."""
    keys = [(k, label.split(" (")[0]) for k, label, percent in ROWS if percent]
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    xs = range(len(keys))
    width = 0.38 if before else 0.6
    if before:
        ax.bar([x - width / 2 for x in xs], [100 * (before.get(k) or 0) for k, _ in keys], width, label=t("before"))
    ax.bar([x + (width / 2 if before else 0) for x in xs], [100 * (after.get(k) or 0) for k, _ in keys], width,
           label=t("after"))
    ax.set_xticks(list(xs), [label for _, label in keys], fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def report_of(job: Job | None, t):
    """(figures table, chart, replies) of a finished eval job; empty while it runs."""
    if job is None or state_of(job) != "finished":
        return "", None, ""
    after_path = output_of(job.commands[0])
    after = read_figures(after_path)
    if after is None:
        return "", None, ""
    before = before_figures(job, after_path)
    table = f"`{after_path}`\n\n" + figures_table(before, after["figures"], markdown=True)
    replies = "\n".join(f"- {'✅' if p['passed'] else '❌'} **{p['query']}**  \n  {p['reply'][:300]}"
                        for p in after.get("probes", [])[:8])
    return table, chart(before, after["figures"], t), replies


def build(ctx: Context, demo: gr.Blocks) -> None:
    """The tab's components and events (call inside a gr.Tab)."""
    t = ctx.t
    with gr.Row():
        checkpoint = gr.Dropdown(checkpoint_choices(ctx), label=t("eval_checkpoint"), allow_custom_value=True, scale=4,
                                 elem_id="eval-checkpoint")
        refresh = gr.Button(t("refresh"), scale=1, elem_id="eval-refresh")
    checkpoint_error = gr.Markdown(visible=False, elem_classes="lk-error", elem_id="eval-checkpoint-error")
    with gr.Row():
        with gr.Column():
            name = gr.Textbox(label=t("eval_name"), info="--model_name", elem_id="eval-model_name")
            name_error = gr.Markdown(visible=False, elem_classes="lk-error")
        with gr.Column():
            author = gr.Textbox(label=t("eval_author"), info="--model_author", elem_id="eval-model_author")
            author_error = gr.Markdown(visible=False, elem_classes="lk-error")
    base_too = gr.Checkbox(True, label=t("eval_base_too"), elem_id="eval-base")
    command_box = gr.Code(label=t("command"), language="shell", interactive=False, wrap_lines=True, lines=2,
        elem_id="eval-command")
    with gr.Row():
        start = gr.Button(t("start"), variant="primary", elem_id="eval-start")
        stop = gr.Button(t("stop"), variant="stop", elem_id="eval-stop")
    message = gr.Markdown(elem_id="eval-message")
    status = gr.Markdown(elem_id="eval-status")
    log = gr.Textbox(label=t("log"), lines=8, max_lines=8, interactive=False, elem_id="eval-log")
    gr.Markdown(f"### {t('report')}")
    with gr.Row():
        table = gr.Markdown(elem_id="eval-report")
        plot = gr.Plot(label=t("chart"), elem_id="eval-chart")
    replies = gr.Markdown(elem_id="eval-replies")
    shown = gr.State("")

    inputs = [checkpoint, name, author, base_too]

    def preview(spec, name_text, author_text, base_on):
        cmds, problems = eval_commands(ctx, spec, name_text, author_text, base_on)
        by_field = {p.field: p.message for p in problems}
        text = "\n".join(c.text() for c in cmds) if spec else ""
        return [text, error_markdown(by_field.get("checkpoint") if spec else None),
                error_markdown(by_field.get("model_name")), error_markdown(by_field.get("model_author"))]

    def on_start(spec, name_text, author_text, base_on):
        cmds, problems = eval_commands(ctx, spec, name_text, author_text, base_on)
        if problems:
            return failed_box(t("fix_form", message=problems[0].message))
        try:
            ctx.runner.start("eval", cmds)
        except UserError as exc:
            return failed_box(exc)
        return ""

    def on_stop():
        return stop_job(ctx, "eval")

    def tick(last):
        job = ctx.runner.latest("eval")
        key = f"{job.id}:{state_of(job)}" if job else ""
        report = report_of(job, t) if key != last else (gr.skip(), gr.skip(), gr.skip())
        return status_markdown(job, t), tail(job.log(), 8) if job else "", *report, key

    preview_outputs = [command_box, checkpoint_error, name_error, author_error]
    for component in inputs:
        component.change(preview, inputs, preview_outputs, show_progress="hidden",
                         concurrency_limit=1, concurrency_id="eval-preview", trigger_mode="always_last")
    refresh.click(lambda: gr.update(choices=checkpoint_choices(ctx)), None, [checkpoint])
    start.click(preview, inputs, preview_outputs, show_progress="hidden").then(
        on_start, inputs, [message], show_progress="hidden")
    stop.click(on_stop, None, [message], show_progress="hidden")
    gr.Timer(1.0).tick(tick, [shown], [status, log, table, plot, replies, shown], show_progress="hidden")
    demo.load(lambda: gr.update(choices=checkpoint_choices(ctx)), None, [checkpoint])
