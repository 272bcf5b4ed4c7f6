"""`lorakit web-ui` in a real headless Chromium: fill the Train form, check its command, train the tiny model and
watch the loss arrive, see a crashing run's error, chat with the result (streamed, beside its base), run and
stop an eval, export. Screenshots of every tab are saved (the folder is printed) for a person to look at."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # browser_or_skip says what to install (and fails in CI)
    expect = sync_playwright = None

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and Path(p).is_file()), None)
STEPS = 24


def browser_or_skip():
    """Playwright and Chromium; in CI a missing browser fails the test (it must run there), elsewhere it skips."""
    missing = None
    if sync_playwright is None:
        missing = "the playwright package is not installed (pip install playwright)"
    if CHROMIUM is None:
        missing = "no Chromium at /usr/bin/chromium (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI, but {missing}; install.sh installs both.")
        pytest.skip(f"browser test skipped outside CI: {missing}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def web_ui(tmp_path):
    """`lorakit web-ui` started as a user would, in tmp_path; yields its URL."""
    browser_or_skip()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "web-ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "web-ui", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "web-ui.log").read_text()
            assert time.time() < end, "the web UI did not start listening within 180 s"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("LORAKIT_TEST_ARTIFACTS", tmp_path / "artifacts")) / "webui"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nweb UI screenshots: {folder}")
    return folder


def fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(text)
    box.dispatch_event("blur")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def code_text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} .cm-content").inner_text().strip()


def wait_text(page, elem_id: str, text: str, timeout_s: float = 120) -> None:
    page.locator(f"#{elem_id}").get_by_text(text).first.wait_for(timeout=timeout_s * 1000)


def write_data(folder: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(48)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "broken.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}\n')


def test_train_chat_eval_export_in_a_browser(web_ui, tmp_path, tiny_qwen2_dir, shots):
    write_data(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(60_000)  # a busy 2-core CI machine: each event is a round trip to the server
        expect.set_options(timeout=60_000)
        page.goto(web_ui)
        train_run(page, tmp_path, tiny_qwen2_dir, shots)
        checkpoint = next(tmp_path.glob(f"output/v*/checkpoint-{STEPS}"))
        crash_run(page, shots)
        chat(page, checkpoint, shots)
        eval_run(page, checkpoint, shots)
        export_run(page, checkpoint, shots)
        browser.close()


def train_run(page, tmp_path: Path, model: Path, shots: Path) -> None:
    choose(page, "train-method", "sft")
    expect(page.locator("#train-num_train_epochs textarea")).to_have_value("1.0")  # sft's default, not quickstart's
    fill(page, "train-model", str(model))
    fill(page, "train-dataset", "data.jsonl")  # relative: shown absolute in the command
    fill(page, "train-lora_rank", "0")
    error = page.locator("#train-lora_rank-error")
    expect(error).to_contain_text("--lora_rank must be positive, got 0.")  # the CLI's own words, at the field
    fill(page, "train-lora_rank", "4")
    expect(error).to_be_hidden()
    fill(page, "train-max_steps", str(STEPS))
    fill(page, "train-logging_steps", "1")
    fill(page, "train-save_steps", "12")
    fill(page, "train-extra", "--report_to none --per_device_train_batch_size 2")
    expected = (f"lorakit sft --model {model} --dataset {tmp_path / 'data.jsonl'} --lora_rank 4 --max_steps {STEPS} "
                f"--logging_steps 1 --save_steps 12 --output_dir {tmp_path / 'output'} --report_to none "
                f"--per_device_train_batch_size 2")
    expect(page.locator("#train-command .cm-content")).to_have_text(expected)
    page.click("#train-start")
    wait_text(page, "train-progress", "loss points", 180)
    page.click("#train-start")  # a second Start while it runs says what is running
    expect(page.locator("#train-message")).to_contain_text("a train job is running", timeout=30000)
    expect(page.locator("#train-message")).to_contain_text("lorakit sft --model")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "train-running.png"), full_page=True)
    wait_text(page, "train-status", "Finished", 180)
    expect(page.locator("#train-progress")).to_contain_text(f"step {STEPS} / {STEPS}")
    expect(page.locator("#train-progress")).to_contain_text(f"{STEPS} loss points")
    expect(page.locator("#train-status")).to_contain_text(f"checkpoint-{STEPS}")
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    page.screenshot(path=str(shots / "train-finished.png"), full_page=True)


def crash_run(page, shots: Path) -> None:
    fill(page, "train-dataset", "broken.jsonl")
    page.click("#train-start")
    wait_text(page, "train-status", "Failed", 180)
    expect(page.locator("#train-status")).to_contain_text("broken.jsonl")  # the CLI's error, in the page
    page.screenshot(path=str(shots / "train-failed.png"), full_page=True)
    fill(page, "train-lora_rank", "8")  # the page still answers
    expect(page.locator("#train-command .cm-content")).not_to_contain_text("--lora_rank")


def chat(page, checkpoint: Path, shots: Path) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.click("#chat-refresh")
    choose(page, "chat-model", f"{checkpoint.parent.name}/{checkpoint.name}")
    page.locator("#chat-compare input").check()
    fill(page, "chat-max_new_tokens", "24")
    expect(page.locator("#chat-command .cm-content")).to_contain_text(f"lorakit infer --adapters {checkpoint}")
    # record every text the reply takes while it streams
    page.evaluate("""() => { window.replyStates = new Set();
        new MutationObserver(() => { const bots = document.querySelectorAll('#chat-tuned .bot');
            if (bots.length) window.replyStates.add(bots[bots.length - 1].innerText); })
        .observe(document.querySelector('#chat-tuned'), {subtree: true, childList: true, characterData: true}); }""")
    fill(page, "chat-message", "Who are you?")
    page.click("#chat-send")
    expect(page.locator("#chat-tuned .bot").last).not_to_have_text("…", timeout=120000)
    expect(page.locator("#chat-base .bot").last).not_to_have_text("…", timeout=120000)
    page.wait_for_timeout(1000)
    states = page.evaluate("() => [...window.replyStates].filter(s => s.trim() && s.trim() !== '…')")
    assert len(states) >= 2, f"the reply did not stream: {states}"
    page.screenshot(path=str(shots / "chat.png"), full_page=True)


def eval_run(page, checkpoint: Path, shots: Path) -> None:
    page.get_by_role("tab", name="Eval").click()
    page.click("#eval-refresh")
    choose(page, "eval-checkpoint", f"{checkpoint.parent.name}/{checkpoint.name}")
    fill(page, "eval-model_name", "Nova")
    fill(page, "eval-model_author", "Acme")
    command = page.locator("#eval-command .cm-content")
    expect(command).to_contain_text(f"lorakit eval --adapters {checkpoint} --model_name Nova --model_author Acme "
                                    f"--eval_output {checkpoint / 'eval.json'}")
    expect(command).to_contain_text(f"--eval_output {checkpoint / 'eval-base.json'}")
    page.click("#eval-start")
    wait_text(page, "eval-status", "Running", 60)
    page.screenshot(path=str(shots / "eval.png"), full_page=True)
    page.click("#eval-stop")
    wait_text(page, "eval-status", "Stopped", 60)


def export_run(page, checkpoint: Path, shots: Path) -> None:
    page.get_by_role("tab", name="Export").click()
    page.click("#export-refresh")
    choose(page, "export-checkpoint", f"{checkpoint.parent.name}/{checkpoint.name}")
    expect(page.locator("#export-command .cm-content")).to_have_text(
        f"lorakit export --adapters {checkpoint} --merge_lora true")
    page.click("#export-start")
    wait_text(page, "export-status", "Finished", 180)
    merged = f"{checkpoint}-merged"
    expect(page.locator("#export-check")).to_contain_text("merge check (3 prompts, greedy 24 tokens): OK")
    expect(page.locator("#export-files")).to_contain_text(merged)
    expect(page.locator("#export-use")).to_contain_text(f"lorakit infer --model {merged}")
    page.screenshot(path=str(shots / "export.png"), full_page=True)
