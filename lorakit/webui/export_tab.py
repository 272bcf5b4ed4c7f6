"""The Export tab: `lorakit export` (merge and its check, GGUF, Ollama Modelfile), the files written, their use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import gradio as gr

from lorakit.errors import UserError
from lorakit.webui import commands
from lorakit.webui.commands import Command, Problem
from lorakit.webui.jobs import Job
from lorakit.webui.panel import Context, error_markdown, failed_box, state_of, status_markdown, stop_job
from lorakit.webui.progress import list_checkpoints, screen_lines, tail

GGUF_TYPES = [("-", ""), ("f16", "f16"), ("bf16", "bf16"), ("q8_0", "q8_0")]


def checkpoint_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(f"{c.parent.name}/{c.name}", str(c)) for c in list_checkpoints(ctx.output_dir)]


def export_command(ctx: Context, spec: str, merge: bool, gguf: str, ollama: bool, output_dir: str
                   ) -> tuple[Command | None, list[Problem]]:
    if not spec:
        return None, []
    form = {"adapters": spec, "merge_lora": "true" if merge else "", "to_gguf": gguf or "",
            "to_ollama": "true" if ollama else "", "output_dir": output_dir}
    cmd, problems = commands.build_command("export", form, cwd=ctx.cwd)
    return cmd, [Problem("checkpoint" if p.field == "adapters" else p.field, p.message) for p in problems]


def merge_check(log: str) -> str:
    """The merge check's lines from the log ('' before it ran)."""
    lines = screen_lines(log)
    for i, line in enumerate(lines):
        if line.startswith("merge check"):
            return "\n".join(lines[i:i + 4])
    return ""


def written(log: str) -> list[Path]:
    """Paths the export printed as 'wrote PATH'."""
    return [Path(m.group(1)) for m in re.finditer(r"^wrote (\S+)", log, re.MULTILINE)]


def _size(path: Path) -> str:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return f"{size / 2**20:.1f} MiB"


def files_markdown(paths: list[Path]) -> str:
    rows = []
    for path in paths:
        if not path.exists():
            continue
        rows.append(f"- `{path}` ({_size(path)})")
        if path.is_dir():
            rows += [f"  - {f.name} ({_size(f)})" for f in sorted(path.iterdir()) if f.is_file()]
    return "\n".join(rows)


def usage(paths: list[Path], log: str) -> str:
    """Commands that use what was written."""
    lines = []
    folders = [p for p in paths if p.is_dir()]
    if folders:
        lines += [f"lorakit infer --model {shlex.quote(str(folders[0]))}",
                  f"lorakit deploy --model {shlex.quote(str(folders[0]))}"]
    for gguf in (p for p in paths if p.suffix == ".gguf"):
        lines.append(f"llama-cli -m {shlex.quote(str(gguf))} -cnv")
    ollama = re.search(r"create the model with: (.+)$", log, re.MULTILINE)
    if ollama:
        lines.append(ollama.group(1).strip())
    return "\n".join(lines)


def results(job: Job | None):
    """(merge check, files, usage) of the latest export job."""
    if job is None:
        return "", "", ""
    log = job.log()
    paths = written(log) if state_of(job) == "finished" else []
    return merge_check(log), files_markdown(paths), usage(paths, log)


def build(ctx: Context, demo: gr.Blocks) -> None:
    """The tab's components and events (call inside a gr.Tab)."""
    t = ctx.t
    with gr.Row():
        checkpoint = gr.Dropdown(checkpoint_choices(ctx), label=t("export_checkpoint"), allow_custom_value=True,
                                 scale=4, elem_id="export-checkpoint")
        refresh = gr.Button(t("refresh"), scale=1, elem_id="export-refresh")
    checkpoint_error = gr.Markdown(visible=False, elem_classes="lk-error")
    with gr.Row():
        merge = gr.Checkbox(True, label=t("merge"), info="--merge_lora", elem_id="export-merge")
        gguf = gr.Dropdown(GGUF_TYPES, value="", label=t("to_gguf"), info="--to_gguf", elem_id="export-gguf")
        ollama = gr.Checkbox(False, label=t("to_ollama"), info="--to_ollama", elem_id="export-ollama")
    output_dir = gr.Textbox(label=t("export_output"), info="--output_dir", elem_id="export-output_dir")
    output_error = gr.Markdown(visible=False, elem_classes="lk-error")
    command_box = gr.Code(label=t("command"), language="shell", interactive=False, wrap_lines=True, lines=2,
        elem_id="export-command")
    with gr.Row():
        start = gr.Button(t("start"), variant="primary", elem_id="export-start")
        stop = gr.Button(t("stop"), variant="stop", elem_id="export-stop")
    message = gr.Markdown(elem_id="export-message")
    status = gr.Markdown(elem_id="export-status")
    check = gr.Code(label=t("merge_check"), language=None, interactive=False, elem_id="export-check")
    with gr.Row():
        files = gr.Markdown(label=t("files"), elem_id="export-files")
        use = gr.Code(label=t("use_it"), language="shell", interactive=False, wrap_lines=True, lines=2,
            elem_id="export-use")
    log = gr.Textbox(label=t("log"), lines=8, max_lines=8, interactive=False, elem_id="export-log")

    inputs = [checkpoint, merge, gguf, ollama, output_dir]

    def preview(*values):
        cmd, problems = export_command(ctx, *values)
        by_field = {p.field: p.message for p in problems}
        return cmd.text() if cmd else "", error_markdown(by_field.get("checkpoint")), error_markdown(
            by_field.get("output_dir") or by_field.get(""))

    def on_start(*values):
        cmd, problems = export_command(ctx, *values)
        if cmd is None or problems:
            why = problems[0].message if problems else t("export_checkpoint")
            return failed_box(t("fix_form", message=why))
        try:
            ctx.runner.start("export", [cmd])
        except UserError as exc:
            return failed_box(exc)
        return ""

    def on_stop():
        return stop_job(ctx, "export")

    def tick():
        job = ctx.runner.latest("export")
        return (status_markdown(job, t), *results(job), tail(job.log(), 8) if job else "")

    preview_outputs = [command_box, checkpoint_error, output_error]
    for component in inputs:
        component.change(preview, inputs, preview_outputs, show_progress="hidden",
                         concurrency_limit=1, concurrency_id="export-preview", trigger_mode="always_last")
    refresh.click(lambda: gr.update(choices=checkpoint_choices(ctx)), None, [checkpoint])
    start.click(preview, inputs, preview_outputs, show_progress="hidden").then(
        on_start, inputs, [message], show_progress="hidden")
    stop.click(on_stop, None, [message], show_progress="hidden")
    gr.Timer(1.0).tick(tick, None, [status, check, files, use, log], show_progress="hidden")
    demo.load(lambda: gr.update(choices=checkpoint_choices(ctx)), None, [checkpoint])
