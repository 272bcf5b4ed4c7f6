"""`lorakit web-ui`: assemble the four tabs and serve them (127.0.0.1 unless --host says otherwise)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import gradio as gr
import httpx
from gradio import networking

from lorakit.args import WebUIArgs
from lorakit.webui import chat_tab, eval_tab, export_tab, train_tab
from lorakit.webui.jobs import JobRunner
from lorakit.webui.labels import Labels
from lorakit.webui.panel import CSS, Context

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# System fonts only: the page must not wait on a font server (CI and offline machines have none).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def open_warning(args: WebUIArgs) -> str | None:
    """The warning for a page reachable from the network without a password."""
    if args.host in LOCAL_HOSTS or args.auth:
        return None
    return Labels(args.lang)("open_warning", host=args.host)


def build_app(args: WebUIArgs, cwd: Path | None = None) -> gr.Blocks:
    """The page: Train, Chat, Eval, Export."""
    cwd = Path(cwd or Path.cwd()).resolve()
    output_dir = (cwd / Path(args.output_dir).expanduser()).resolve()
    t = Labels(args.lang)
    ctx = Context(runner=JobRunner(output_dir / "webui-jobs", cwd=cwd), output_dir=output_dir, cwd=cwd, t=t)
    with gr.Blocks(title=t("title"), analytics_enabled=False) as demo:
        gr.Markdown(f"## {t('title')}\n{t('subtitle')}  \n`{cwd}`")
        warning = open_warning(args)
        if warning:
            gr.Markdown(warning, elem_id="open-warning", elem_classes="lk-failed")
        with gr.Tab(t("tab_train"), elem_id="tab-train"):
            train_tab.build(ctx, demo)
        with gr.Tab(t("tab_chat"), elem_id="tab-chat"):
            chat_tab.build(ctx, demo)
        with gr.Tab(t("tab_eval"), elem_id="tab-eval"):
            eval_tab.build(ctx, demo)
        with gr.Tab(t("tab_export"), elem_id="tab-export"):
            export_tab.build(ctx, demo)
    return demo


def page_answers(url: str) -> bool:
    """Gradio's start-up check that its own page answers, with patience: gradio's own makes one 3-second
    request and refuses to start when a busy machine renders the first page slower than that."""
    for _ in range(10):
        try:
            if httpx.head(url, timeout=30, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def main(args: WebUIArgs) -> int:
    """Serve the page until Ctrl-C; jobs started from it keep running in their own processes."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    warning = open_warning(args)
    if warning:
        print(warning.replace("**", ""), file=sys.stderr)
    demo = build_app(args)
    networking.url_ok = page_answers
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    print(f"lorakit web-ui: http://{'localhost' if args.host in LOCAL_HOSTS else args.host}:{args.port}",
          file=sys.stderr)
    demo.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, auth=auth, share=False, inbrowser=False, quiet=True,
        ssr_mode=False, show_error=True, theme=THEME, css=CSS)
    return 0
