"""The Chat tab: talk to the base model or any checkpoint, streamed, optionally side by side with its base.

Models load in this process through `lorakit infer`'s own loading path (the flags are the ones shown
in the tab's command box and parsed by the CLI's parser), at most two at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr

from lorakit import cli
from lorakit.checkpoint import find_checkpoint
from lorakit.data.loading import resolve_system
from lorakit.errors import UserError
from lorakit.infer import chat
from lorakit.loader import saved_args
from lorakit.webui import commands
from lorakit.webui.panel import Context
from lorakit.webui.progress import list_checkpoints

SAMPLING = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")
MAX_LOADED = 2  # the chosen model and its base


class Sessions:
    """Loaded models by (model, adapters), the least recently used dropped past MAX_LOADED."""

    def __init__(self):
        self._loaded: OrderedDict[tuple, chat.ChatSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, args) -> chat.ChatSession:
        key = (args.model.model, tuple(args.adapter.adapters))
        with self._lock:
            if key not in self._loaded:
                while len(self._loaded) >= MAX_LOADED:
                    self._loaded.popitem(last=False)
                self._loaded[key] = chat.load_session(replace(args, adapter=replace(args.adapter, system=None)))
            self._loaded.move_to_end(key)
            return self._loaded[key]


def model_choices(ctx: Context) -> list[tuple[str, str]]:
    """The embedded base model, then every checkpoint under the output folder (newest first)."""
    choices = [(ctx.t("base_model_choice", model="SmolLM2-135M-Instruct (embedded)"), "")]
    return choices + [(f"{c.parent.name}/{c.name}", str(c)) for c in list_checkpoints(ctx.output_dir)]


def is_checkpoint_spec(spec: str, cwd: Path) -> bool:
    if not spec:
        return False
    try:
        find_checkpoint(cwd / spec)
    except UserError:
        return False
    return True


def chat_command(ctx: Context, spec: str, system: str, sampling: dict[str, str], *, base: bool = False):
    """The `lorakit infer` command that chats with `spec` (its base model when base=True), and its parsed args."""
    form: dict[str, str] = {"system": system, **sampling}
    if is_checkpoint_spec(spec, ctx.cwd):
        ckpt = find_checkpoint(ctx.cwd / spec)
        if base:
            form["model"] = saved_args(ckpt).model_path or ""
        else:
            form["adapters"] = str(ckpt)
    else:
        form["model"] = spec
    cmd, problems = commands.build_command("infer", form, cwd=ctx.cwd)
    if problems:
        raise UserError(problems[0].message)
    return cmd, cli.build_args(cli.COMMANDS["infer"][1], cli.parse_argv("infer", cmd.flags))


def reply_stream(session: chat.ChatSession, args, history: list[dict]) -> Iterator[str]:
    """The reply so far, after each streamed piece."""
    system = resolve_system(args.adapter.system)
    turn = chat.ChatSession(session.engine, system if system is not None else session.system, session.label)
    params, _ = chat.sampling_params(args.generation, session.engine.model.generation_config)
    prompt, _ = chat.fit_prompt(turn, history, params, lambda note: None)
    text = ""
    for piece in session.engine.stream(prompt, params):
        text += piece
        yield text


def build(ctx: Context, demo: gr.Blocks) -> None:
    """The tab's components and events (call inside a gr.Tab)."""
    t = ctx.t
    sessions = Sessions()
    infer_flags = commands.flags_of("infer")
    with gr.Row():
        model = gr.Dropdown(model_choices(ctx), value="", label=t("chat_model"), allow_custom_value=True, scale=4,
                            elem_id="chat-model")
        refresh = gr.Button(t("refresh"), scale=1, elem_id="chat-refresh")
        compare = gr.Checkbox(False, label=t("compare"), scale=2, elem_id="chat-compare")
    system = gr.Textbox(label=t("chat_system"), elem_id="chat-system")
    with gr.Accordion(t("sampling"), open=True):
        with gr.Row():
            boxes = [gr.Textbox(commands.default_text(infer_flags[name]), label=t(name), info=f"--{name}",
                                elem_id=f"chat-{name}", min_width=140) for name in SAMPLING]
    command_box = gr.Code(label="lorakit infer", language="shell", interactive=False, wrap_lines=True, lines=2,
        elem_id="chat-command")
    with gr.Row():
        tuned_bot = gr.Chatbot(label=t("tuned_reply"), elem_id="chat-tuned", height=360)
        base_bot = gr.Chatbot(label=t("base_reply"), elem_id="chat-base", height=360, visible=False)
    with gr.Row():
        message = gr.Textbox(label=t("message"), scale=5, elem_id="chat-message", submit_btn=False)
        send = gr.Button(t("send"), variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button(t("clear"), scale=1, elem_id="chat-clear")
    note = gr.Markdown(elem_id="chat-note", elem_classes="lk-error")

    def preview(spec, system_text, *sampling):
        try:
            cmd, _ = chat_command(ctx, spec or "", system_text, dict(zip(SAMPLING, sampling)))
            return cmd.text(), ""
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}"

    def respond(spec, compare_on, system_text, text, tuned_history, base_history, *sampling):
        if not (text or "").strip():
            yield gr.skip(), gr.skip(), gr.skip(), ""
            return
        sampling_form = dict(zip(SAMPLING, sampling))
        try:
            _, args = chat_command(ctx, spec or "", system_text, sampling_form)
            side = compare_on and is_checkpoint_spec(spec or "", ctx.cwd)
            base_args = chat_command(ctx, spec, system_text, sampling_form, base=True)[1] if side else None
        except UserError as exc:
            yield gr.skip(), gr.skip(), gr.skip(), f"⚠ {exc}"
            return
        asked = {"role": "user", "content": text}
        tuned = list(tuned_history or []) + [asked, {"role": "assistant", "content": "…"}]
        base = list(base_history or []) + ([asked, {"role": "assistant", "content": "…"}] if side else [])
        yield tuned, base, "", t("loading", what=spec or "the base model")
        try:
            streams = [(tuned, reply_stream(sessions.get(args), args, tuned[:-1]))]
            if side:
                streams.append((base, reply_stream(sessions.get(base_args), base_args, base[:-1])))
            while streams:  # alternate the two replies piece by piece, so they grow side by side
                for history, stream in list(streams):
                    try:
                        history[-1] = {"role": "assistant", "content": next(stream)}
                    except StopIteration:
                        streams.remove((history, stream))
                        if history[-1]["content"] == "…":
                            history[-1] = {"role": "assistant", "content": "(empty reply)"}
                yield tuned, base, "", ""
        except UserError as exc:
            yield tuned[:-2], base[:-2] if side else base, text, f"⚠ {exc}"

    sampling_inputs = [model, system, *boxes]
    for component in sampling_inputs:
        component.change(preview, sampling_inputs, [command_box, note], show_progress="hidden",
                         concurrency_limit=1, concurrency_id="chat-preview", trigger_mode="always_last")
    compare.change(lambda on: gr.update(visible=on), [compare], [base_bot])
    refresh.click(lambda: gr.update(choices=model_choices(ctx)), None, [model])
    chat_inputs = [model, compare, system, message, tuned_bot, base_bot, *boxes]
    send.click(respond, chat_inputs, [tuned_bot, base_bot, message, note], show_progress="hidden")
    message.submit(respond, chat_inputs, [tuned_bot, base_bot, message, note], show_progress="hidden")
    clear.click(lambda: ([], [], ""), None, [tuned_bot, base_bot, note])
    demo.load(preview, sampling_inputs, [command_box, note], show_progress="hidden")
    demo.load(lambda: gr.update(choices=model_choices(ctx)), None, [model])
