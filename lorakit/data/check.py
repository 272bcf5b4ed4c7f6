"""`lorakit check-data` on sft rows: show exactly what `sft` would train on, loading only the tokenizer.

Per dataset it prints the absolute path or ID, the formats detected, rows loaded / kept /
dropped / truncated and why, token length min / p50 / p95 / max, loss-bearing tokens, the
effective system prompt, and one fully rendered example with the learned spans marked.
Exit status 1 when a dataset yields zero rows or any row is malformed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorakit.data.loading import MAX_LISTED_ERRORS, DatasetReport, TrainData, build_datasets
from lorakit.data.packing import pack_sequences
from lorakit.data.render import IGNORE_INDEX, Rendered, set_chat_template, template_default_system
from lorakit.errors import UserError
from lorakit.gguf_reader import gguf_cache_name
from lorakit.model import find_gguf, is_hub_id, load_tokenizer, resolve_model_path
from lorakit.paths import cache_root

GREEN, RESET = "\033[1;32m", "\033[0m"


def main(args) -> int:
    """check-data on sft rows (args: CheckDataArgs / SftArgs); exit 1 when not ready."""
    tokenizer = load_tokenizer_only(args.model)
    data = build_datasets(args.data, tokenizer, use_hf=args.model.use_hf, template=args.model.template, strict=False)
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    print(format_report(data, tokenizer, data_args=args.data, color=color))
    return 1 if any(r.errors for r in data.reports) or not data.train else 0


def load_tokenizer_only(model_args) -> PreTrainedTokenizerBase:
    """The tokenizer --model names, without converting or loading any weights."""
    name = model_args.model
    gguf = find_gguf(name, model_args.gguf_file)
    local = Path(name or "").expanduser()
    if gguf is not None:
        tokenizer = _gguf_tokenizer(gguf)
    elif local.is_dir() and (local / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(local)  # a tokenizer folder is enough; weights not needed
    elif not local.exists() and is_hub_id(name) and model_args.use_hf is not False:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise UserError(f"--model {name}: could not fetch its tokenizer from the Hugging Face hub: {e}") from None
    else:
        tokenizer = load_tokenizer(resolve_model_path(name, use_hf=model_args.use_hf, gguf_file=model_args.gguf_file))
    set_chat_template(tokenizer, model_args.template)
    return tokenizer


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Tokenizer of a .gguf file, saved once as a plain folder so later runs load it in a second."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    folder = cache_root() / "tokenizers" / gguf_cache_name(path)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    if not folder.exists():
        tmp.rename(folder)
    return tokenizer


def format_report(data: TrainData, tokenizer: PreTrainedTokenizerBase, *, data_args=None, color: bool = False) -> str:
    """The whole check-data report as text (also printed by `sft --dry_run true`)."""
    lines = []
    for report in data.reports:
        lines += _dataset_lines(report, tokenizer, data.system, color)
        lines.append("")
    lines.append(f"total: {len(data.train)} training samples, {len(data.val)} validation samples")
    if data_args is not None and getattr(data_args, "packing", False) and data.train:
        rows = pack_sequences(data.train, data_args.max_length)
        lines.append(f"packing: {len(data.train)} samples -> {len(rows)} rows of at most {data_args.max_length} tokens")
    bad = [r for r in data.reports if r.errors]
    if bad:
        lines.append(f"NOT READY: {len(bad)} dataset(s) with errors; fix them before training.")
    return "\n".join(lines)


def _dataset_lines(r: DatasetReport, tokenizer: PreTrainedTokenizerBase, system: str | None, color: bool) -> list[str]:
    formats = ", ".join(f"{name} ({n} rows)" for name, n in r.formats.items()) or "none detected"
    out = [
        f"{r.role} dataset: {r.location}" + (f"  (spec {r.spec})" if r.spec != r.location else ""),
        f"  format: {formats}",
        f"  rows: {r.rows_read} loaded, {r.rows_sampled} after sampling, {r.rows_kept} kept, "
        f"{sum(r.dropped.values())} dropped, {r.truncated} truncated",
    ]
    if r.role == "train":
        out.append(f"  split: {r.train_rows} train, {r.val_rows} validation")
    out += [f"    dropped {n}: {why}" for why, n in r.dropped.items()]
    if r.lengths:
        L = r.lengths
        out.append(f"  tokens: min {L.min} / p50 {L.p50} / p95 {L.p95} / max {L.max}; loss-bearing tokens {r.loss_tokens}")
    if r.loss_scales:
        scaled = ", ".join(f"{n} at {scale:g}" for scale, n in r.loss_scales.items())
        out.append(f"  loss_scale (each answer token's loss times it): rows {scaled}; "
                   f"{r.rows_kept - sum(r.loss_scales.values())} at 1")
    out.append(f"  system prompt: {_system_line(r, tokenizer, system)}")
    if r.special_token_rows:
        out.append(f"  WARNING: {len(r.special_token_rows)} row(s) contain special-token text (e.g. <|im_end|>), read as "
                   f"control tokens, not text; first: {r.special_token_rows[0]}")
    if r.cache_hit:
        out.append("  (tokenised data read from the cache)")
    if r.errors:
        out.append(f"  ERRORS ({len(r.errors)}):")
        out += [f"    {e}" for e in r.errors[:MAX_LISTED_ERRORS]]
        if len(r.errors) > MAX_LISTED_ERRORS:
            out.append(f"    ... and {len(r.errors) - MAX_LISTED_ERRORS} more")
    if r.example is not None:
        how = "highlighted" if color else "inside [[ ]]"
        out.append(f"  example, as the model sees it (the loss-bearing tokens, learned, are {how}):")
        out += ["    " + line for line in mark_loss_spans(tokenizer, r.example, color=color).rstrip("\n").split("\n")]
    return out


def _system_line(r: DatasetReport, tokenizer: PreTrainedTokenizerBase, system: str | None) -> str:
    if system is not None:
        fallback = f"--system {system!r}"
    else:
        default = template_default_system(tokenizer)
        fallback = f"the template's default {default!r}" if default else "none (the template adds no default)"
    if r.rows_with_own_system == 0:
        return fallback
    if r.rows_with_own_system == r.rows_sampled:
        return "each row's own system prompt"
    return f"each row's own in {r.rows_with_own_system} rows; the others get {fallback}"


def mark_loss_spans(tokenizer: PreTrainedTokenizerBase, sample: Rendered, *, color: bool = False) -> str:
    """Decode a sample with its loss-bearing runs wrapped in colour or [[ ]]."""
    pieces, run, learned = [], [], None
    for token, label in zip(sample.input_ids, sample.labels):
        is_loss = label != IGNORE_INDEX
        if learned is not None and is_loss != learned:
            pieces.append(_mark(tokenizer.decode(run), learned, color))
            run = []
        run.append(token)
        learned = is_loss
    if run:
        pieces.append(_mark(tokenizer.decode(run), learned, color))
    return "".join(pieces)


def _mark(text: str, learned: bool, color: bool) -> str:
    if not learned:
        return text
    return f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
