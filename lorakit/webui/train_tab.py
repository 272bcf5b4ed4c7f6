"""The Train tab: a form that writes a `lorakit quickstart | sft | rlhf` command, runs it, and follows the run."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from lorakit.errors import UserError
from lorakit.webui import commands
from lorakit.webui.jobs import Job
from lorakit.webui.panel import Context, error_markdown, failed_box, progress_html, status_markdown, stop_job
from lorakit.webui.progress import list_runs, read_progress, tail

DEFAULT_METHOD = "quickstart (identity)"
CHOICE_FIELDS = {"train_type": ["lora", "full"]}
WIDE_FIELDS = ("model", "adapters", "dataset", "system", "output_dir")


def form_of(names: list[str], values: list) -> dict[str, str]:
    return {name: "" if value is None else str(value) for name, value in zip(names, values)}


def method_command(method: str) -> tuple[str, tuple[str, ...]]:
    return commands.methods().get(method, commands.BASE_METHODS[DEFAULT_METHOD])


def build_from(ctx: Context, method: str, form: dict[str, str], extra: str, *, required: bool = True):
    command, fixed = method_command(method)
    return commands.build_command(command, form, cwd=ctx.cwd, fixed=fixed, extra=extra, required=required)


def job_of_run(ctx: Context, run_dir: str) -> Job | None:
    """The train job whose log names this run folder (a run started here), if any."""
    for job in ctx.runner.jobs("train"):
        if f"run folder: {run_dir}\n" in job.log():
            return job
    return None


def run_choices(ctx: Context) -> list[tuple[str, str]]:
    """Earlier runs (newest first) under the page's output folder and every folder a job trained into."""
    folders = {ctx.output_dir}
    for job in ctx.runner.jobs("train"):
        p = read_progress(job.log())
        if p.run_dir is not None:
            folders.add(p.run_dir.parent)
    runs = sorted((r for f in folders for r in list_runs(f)), key=lambda r: r.path.stat().st_mtime, reverse=True)
    return [(ctx.t("latest"), "")] + [(r.label(), str(r.path)) for r in runs]


def curve_frame(series: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    """(step, value, series) rows with fixed dtypes (numeric axes whatever the rows)."""
    rows = [(step, value, name) for name, points in series.items() for step, value in points]
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "value": pd.Series([round(r[1], 4) for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="object")})


def loss_frame(p) -> pd.DataFrame:
    return curve_frame({"loss": p.loss, "eval_loss": p.eval_loss})


def reward_frame(p) -> pd.DataFrame:
    return curve_frame({"reward": p.reward, "eval_reward": p.eval_reward})


def show(ctx: Context, viewing: str, last: tuple):
    """(status, progress, loss plot, reward plot, log, signature) of the viewed run: the latest job by default."""
    t = ctx.t
    job = job_of_run(ctx, viewing) if viewing else ctx.runner.latest("train")
    log = job.log() if job else ""
    progress = read_progress(log, Path(viewing) if viewing else None) if (job or viewing) else None
    extra = ""
    if progress and progress.run_dir:
        checkpoints = sorted(progress.run_dir.glob("checkpoint-*"), key=lambda c: c.stat().st_mtime)
        if checkpoints and (job is None or not job.running):
            extra = t("checkpoint_ready", path=checkpoints[-1])
    if job is not None:
        status = status_markdown(job, t, extra=extra)
    elif viewing:
        status = f"`{viewing}`\n\n{extra}"
    else:
        status = t("idle")
    signature = (viewing, job.id if job else None, job.running if job else None,
                 len(progress.loss) + len(progress.eval_loss) if progress else 0,
                 len(progress.reward) + len(progress.eval_reward) if progress else 0)
    changed = [gr.skip(), gr.skip(), gr.skip()]  # redraw plots and the run list only when something changed
    if signature != last:
        # no points yet: None, not an empty frame (a plot whose first frame was empty never draws its line)
        changed = [loss_frame(progress) if progress and (progress.loss or progress.eval_loss) else None,
                   gr.update(value=reward_frame(progress), visible=True) if progress and progress.reward
                   else gr.update(visible=False),
                   gr.update(choices=run_choices(ctx)) if last and signature[:3] != last[:3] else gr.skip()]
    # a job that started or ended makes the last Start/Stop message stale ("a train job is running")
    message = "" if last and signature[:3] != last[:3] else gr.skip()
    return status, progress_html(progress, t), *changed, tail(log, 12) if job else "", message, signature


def build(ctx: Context, demo: gr.Blocks) -> None:
    """The tab's components and events (call inside a gr.Tab)."""
    t = ctx.t
    names = list(commands.TRAIN_FIELDS)
    known = {}  # every flag of the training commands, for its --help text (sft's words first)
    for command in ("sft", *(c for c, _ in commands.methods().values())):
        for name, flag in commands.flags_of(command).items():
            known.setdefault(name, flag)
    first = commands.defaults(method_command(DEFAULT_METHOD)[0])
    boxes: dict[str, gr.components.Component] = {}
    columns: dict[str, gr.Column] = {}
    errors: dict[str, gr.Markdown] = {}

    def field(name: str) -> None:
        with gr.Column(min_width=220, visible=name in first) as column:
            info = f"--{name}" + (f": {known[name].help}" if t.lang == "en" and name in known else "")
            if name in CHOICE_FIELDS:
                boxes[name] = gr.Dropdown(CHOICE_FIELDS[name], value=first.get(name, CHOICE_FIELDS[name][0]),
                                          label=t(name), info=info, elem_id=f"train-{name}")
            else:
                boxes[name] = gr.Textbox(value=first.get(name, ""), label=t(name), info=info, elem_id=f"train-{name}",
                                         lines=3 if name == "dataset" else 1, max_lines=6)
            errors[name] = gr.Markdown(visible=False, elem_classes="lk-error", elem_id=f"train-{name}-error")
        columns[name] = column

    with gr.Row():
        method = gr.Dropdown(list(commands.methods()), value=DEFAULT_METHOD, label=t("method"), scale=1,
                             elem_id="train-method")
        with gr.Column(scale=3):
            field("model")
    with gr.Row():
        field("adapters")  # rlhf: the SFT checkpoint to start from
    with gr.Row():
        with gr.Column(scale=3):
            field("dataset")
        upload = gr.UploadButton(t("upload"), file_types=[".json", ".jsonl", ".csv", ".parquet"], scale=1)
    with gr.Row():
        field("model_name")
        field("model_author")
    with gr.Accordion(t("settings"), open=True):
        with gr.Row():  # a Row wraps its columns at their min_width
            for name in names:
                if name not in ("model", "dataset", "model_name", "model_author") + WIDE_FIELDS:
                    field(name)
        with gr.Row():
            field("system")
            field("output_dir")
        extra = gr.Textbox(label=t("extra"), elem_id="train-extra")
        extra_error = gr.Markdown(visible=False, elem_classes="lk-error", elem_id="train-extra-error")
    command_box = gr.Code(label=t("command"), language="shell", interactive=False, wrap_lines=True, lines=2,
        elem_id="train-command")
    with gr.Row():
        start = gr.Button(t("start"), variant="primary", elem_id="train-start")
        stop = gr.Button(t("stop"), variant="stop", elem_id="train-stop")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", label=t("loss_curve"), elem_id="train-loss",
                                height=260)
        reward_plot = gr.LinePlot(x="step", y="value", color="series", label=t("reward_curve"), visible=False,
                                  elem_id="train-reward", height=260)
    log = gr.Textbox(label=t("log"), lines=12, max_lines=12, interactive=False, elem_id="train-log", autoscroll=True)
    with gr.Row():
        runs = gr.Dropdown(run_choices(ctx), value="", label=t("runs"), scale=4, elem_id="train-runs")
        refresh = gr.Button(t("refresh"), scale=1, elem_id="train-runs-refresh")
        open_run = gr.Button(t("open_run"), scale=1, elem_id="train-open")
    viewing, signature = gr.State(""), gr.State(())
    timer = gr.Timer(1.0)

    inputs = [method, *boxes.values(), extra]
    field_names = list(boxes)

    def check(method_value, values, required):
        form, extra_text = form_of(field_names, values[:-1]), values[-1]
        shown = set(commands.defaults(method_command(method_value)[0]))
        cmd, problems = build_from(ctx, method_value, {k: v for k, v in form.items() if k in shown}, extra_text,
                                   required=required)
        by_field = {p.field: p.message for p in problems}
        marks = [error_markdown(by_field.get(n)) for n in field_names] + [error_markdown(by_field.get(""))]
        return cmd, problems, marks

    def preview(method_value, *values):  # "needs --model_name" waits for Start, not the first keystroke
        cmd, _, marks = check(method_value, values, required=False)
        return [cmd.text(), *marks]

    def on_method(method_value, previous, *values):
        """Show the fields the method takes; a field still at the old method's default gets the new one."""
        old = commands.defaults(method_command(previous)[0])
        wanted = commands.defaults(method_command(method_value)[0])
        updates = [gr.update(value=wanted.get(n, "")) if str(v or "") == old.get(n, "") != wanted.get(n, "")
                   else gr.skip() for n, v in zip(field_names, values)]
        return [*updates, *(gr.update(visible=n in wanted) for n in field_names), method_value]

    def on_start(method_value, *values):
        cmd, problems, marks = check(method_value, values, required=True)
        if problems:
            fix = t("fix_form", message=problems[0].message)
            return [cmd.text(), *marks, failed_box(fix), gr.skip()]
        try:
            ctx.runner.start("train", [cmd])
        except UserError as exc:
            return [cmd.text(), *marks, failed_box(exc), gr.skip()]
        return [cmd.text(), *marks, "", ""]

    def on_stop():
        return stop_job(ctx)

    def on_upload(file, current):
        source = Path(file if isinstance(file, str) else file.name)
        folder = ctx.output_dir / "webui-uploads"
        folder.mkdir(parents=True, exist_ok=True)
        kept = folder / source.name
        shutil.copy(source, kept)
        return "\n".join([line for line in (current or "").splitlines() if line.strip()] + [str(kept.resolve())])

    preview_outputs = [command_box, *errors.values(), extra_error]
    for component in inputs:
        component.change(preview, inputs, preview_outputs, show_progress="hidden",
                         concurrency_limit=1, concurrency_id="train-preview", trigger_mode="always_last")
    previous = gr.State(DEFAULT_METHOD)
    method.change(on_method, [method, previous, *boxes.values()], [*boxes.values(), *columns.values(), previous],
                  show_progress="hidden")
    start.click(on_start, inputs, [*preview_outputs, message, viewing], show_progress="hidden",
                concurrency_limit=1, concurrency_id="train-preview")  # after the form's pending previews
    stop.click(on_stop, None, [message], show_progress="hidden")
    upload.upload(on_upload, [upload, boxes["dataset"]], [boxes["dataset"]])
    refresh.click(lambda: gr.update(choices=run_choices(ctx)), None, [runs])
    open_run.click(lambda chosen: chosen or "", [runs], [viewing])
    outputs = [status, progress, loss_plot, reward_plot, runs, log, message, signature]
    timer.tick(lambda v, s: show(ctx, v, s), [viewing, signature], outputs, show_progress="hidden")
    demo.load(preview, inputs, preview_outputs, show_progress="hidden")
