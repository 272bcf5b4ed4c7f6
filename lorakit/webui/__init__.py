"""`lorakit web-ui`: a Gradio page that drives the lorakit commands.

commands.py builds and checks the exact `lorakit ...` argument lists (with the CLI's own parser and
args dataclasses); jobs.py runs them as separate processes; progress.py reads what a run wrote
(its log, logging.jsonl, checkpoints); labels.py holds the English and Chinese labels; one module
per tab (train_tab, chat_tab, eval_tab, export_tab); app.py assembles the page and serves it.
"""
