"""Dataset specs -> conversations -> rendered train/val samples, with a report per dataset.

A spec is PATH_OR_ID[#N]: a local .json/.jsonl/.csv/.parquet file (relative paths resolve
against the current directory), a hub dataset ID (org/name[:subset]), or the built-in
`self-cognition` (ms-swift: `swift/self-cognition`). #N samples N rows with --seed, repeating
reshuffled copies when N exceeds the dataset. Nothing is skipped silently: malformed rows are
errors with file:line, dropped or truncated samples are counted with their reason.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lorakit.data import cache
from lorakit.data.formats import Conversation
from lorakit.data.render import Rendered, render_conversations, set_chat_template, strip_system_markers
from lorakit.data.sources import (MAX_LISTED_ERRORS, SELF_COGNITION_FILE, SELF_COGNITION_NAMES, DatasetPart,
                                  load_conversations, log_to_stderr, parse_spec, sample_rows)
from lorakit.errors import UserError

__all__ = [  # reading and sampling live in files.py and sources.py; these stay importable from here
    "MAX_LISTED_ERRORS", "SELF_COGNITION_FILE", "DatasetPart", "DatasetReport", "LengthStats", "TrainData",
    "build_datasets", "length_stats", "load_conversations", "parse_spec", "render_part", "resolve_system",
    "rows_with_special_tokens", "sample_rows", "split_val", "truncate",
]

AUTO_SPLIT_MIN_ROWS = 500  # below this, --split_dataset_ratio defaults to 0 (a tiny identity set stays whole)


@dataclass
class LengthStats:
    min: int
    p50: int
    p95: int
    max: int


@dataclass
class DatasetReport:
    """What happened to one dataset on its way to training (printed by check-data and sft)."""

    spec: str
    location: str
    role: str  # "train" or "val"
    formats: dict[str, int]
    rows_read: int
    rows_sampled: int
    rows_kept: int = 0
    train_rows: int = 0
    val_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: int = 0
    lengths: LengthStats | None = None
    loss_tokens: int = 0
    loss_scales: dict[float, int] = field(default_factory=dict)  # a loss_scale other than 1 -> rows kept with it
    rows_with_own_system: int = 0
    special_token_rows: list[str] = field(default_factory=list)  # sources of rows whose text holds e.g. <|im_end|>
    errors: list[str] = field(default_factory=list)
    cache_hit: bool = False
    example_messages: list[dict[str, str]] | None = None
    example: Rendered | None = None


@dataclass
class TrainData:
    """Rendered samples ready for batching, and a report per dataset."""

    train: list[Rendered]
    val: list[Rendered]
    reports: list[DatasetReport]
    system: str | None = None  # resolved --system text


def resolve_system(system: str | None) -> str | None:
    """--system: text, or the contents of a .txt file (an empty value means the template's default)."""
    if system is None or not system.strip():
        return None
    if system.endswith(".txt"):
        path = Path(system).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--system {system}: looks like a .txt file but {path} does not exist")
        text = path.read_text(encoding="utf-8-sig").strip()
        if not text:
            raise UserError(f"--system {system}: {path} is empty")
        return text
    return system


def render_part(
    part: DatasetPart,
    tokenizer: PreTrainedTokenizerBase,
    *,
    system: str | None,
    loss_on_prompt: bool,
    num_proc: int = 1,
    use_cache: bool = True,
    tokenizer_fp: str | None = None,
) -> tuple[list[Rendered], bool]:
    """Render one dataset's conversations (in `num_proc` processes, from the disk cache when possible), each
    sample with its row's loss_scale (a weight, not part of the tokens: the cache holds ids and masks only)."""
    messages = [c.messages for c in part.conversations]
    key = None
    if use_cache and messages:
        fp = tokenizer_fp or cache.tokenizer_fingerprint(tokenizer)
        key = cache.cache_key(messages, tokenizer_fp=fp, system=system, loss_on_prompt=loss_on_prompt)
        hit = cache.load_cached(key)
        if hit is not None and len(hit) == len(messages):
            return with_loss_scales(hit, part.conversations), True
    sources = [c.source for c in part.conversations]
    samples = _render_parallel(tokenizer, messages, sources, system, loss_on_prompt, num_proc)
    if key is not None:
        cache.save_cached(key, samples)
    return with_loss_scales(samples, part.conversations), False


def with_loss_scales(samples: list[Rendered], conversations: list[Conversation]) -> list[Rendered]:
    """Each rendered sample with the loss_scale of the conversation it was rendered from."""
    return [s if c.loss_scale == s.loss_scale else replace(s, loss_scale=c.loss_scale)
            for s, c in zip(samples, conversations, strict=True)]


_WORKER: dict = {}


def _render_chunk(bounds: tuple[int, int]) -> list[Rendered]:
    a, b = bounds
    w = _WORKER
    return render_conversations(
        w["tokenizer"], w["messages"][a:b], system=w["system"], loss_on_prompt=w["loss_on_prompt"], sources=w["sources"][a:b]
    )


def _render_parallel(tokenizer: PreTrainedTokenizerBase, messages, sources, system, loss_on_prompt,
                     num_proc) -> list[Rendered]:
    """Forked workers inherit the tokenizer and rows; each renders a contiguous chunk."""
    chunk = 1000
    bounds = [(a, min(a + chunk, len(messages))) for a in range(0, len(messages), chunk)]
    _WORKER.update(tokenizer=tokenizer, messages=messages, sources=sources, system=system, loss_on_prompt=loss_on_prompt)
    try:
        if num_proc <= 1 or len(bounds) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            return [r for bound in bounds for r in _render_chunk(bound)]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked children must not share Rust threads
        with multiprocessing.get_context("fork").Pool(num_proc) as pool:
            return [r for rs in pool.imap(_render_chunk, bounds) for r in rs]
    finally:
        _WORKER.clear()


@dataclass
class Truncation:
    kept: list[Rendered]
    kept_index: list[int]  # index of each kept sample in the input
    dropped: dict[str, int]  # reason -> rows
    truncated: int


def truncate(samples: list[Rendered], max_length: int, strategy: str) -> Truncation:
    """Apply --max_length/--truncation_strategy (delete, left, right) and count what happened."""
    out = Truncation(kept=[], kept_index=[], dropped={}, truncated=0)
    dropped = Counter()
    for i, s in enumerate(samples):
        if len(s.input_ids) > max_length:
            if strategy == "delete":
                dropped[f"longer than --max_length {max_length} (--truncation_strategy delete)"] += 1
                continue
            cut = slice(-max_length, None) if strategy == "left" else slice(0, max_length)
            s = replace(s, input_ids=s.input_ids[cut], labels=s.labels[cut])
            out.truncated += 1
            if s.num_loss_tokens == 0:
                dropped[f"no answer tokens left after --truncation_strategy {strategy} to {max_length}"] += 1
                continue
        out.kept.append(s)
        out.kept_index.append(i)
    out.dropped = dict(dropped)
    return out


def length_stats(samples: list[Rendered]) -> LengthStats | None:
    """min / p50 / p95 / max token length (nearest rank)."""
    if not samples:
        return None
    lengths = sorted(len(s.input_ids) for s in samples)

    def pick(q: float) -> int:
        return lengths[min(len(lengths) - 1, max(0, round(q * len(lengths) + 0.5) - 1))]

    return LengthStats(min=lengths[0], p50=pick(0.5), p95=pick(0.95), max=lengths[-1])


def split_val(samples: list, ratio: float, seed: int) -> tuple[list, list]:
    """Hold out round(ratio * n) samples (at least 1 when ratio > 0, never all) chosen with `seed`."""
    if ratio <= 0 or len(samples) < 2:
        return samples, []
    n_val = min(len(samples) - 1, max(1, round(ratio * len(samples))))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def build_datasets(
    data_args, tokenizer: PreTrainedTokenizerBase, *, use_hf: bool | None = None, template: str | None = None, strict: bool = True, log=None
) -> TrainData:
    """Load, validate, render, truncate and split every --dataset/--val_dataset; a report per dataset.

    `template` is --template: it is applied to `tokenizer` (set_chat_template) before rendering, so
    save that tokenizer with the checkpoint. strict=False (check-data) keeps going past malformed
    rows and empty datasets, recording them in the reports; strict=True raises UserError on either.
    """
    log = log or log_to_stderr
    if not data_args.dataset:
        raise UserError("no training data: pass --dataset FILE_OR_ID [FILE_OR_ID ...]")
    set_chat_template(tokenizer, template)
    system = strip_system_markers(tokenizer, resolve_system(data_args.system), log=log)
    note_unused_identity(data_args, log)
    fp = cache.tokenizer_fingerprint(tokenizer) if data_args.data_cache else None
    train, val, reports = [], [], []
    for role, specs in (("train", data_args.dataset), ("val", data_args.val_dataset)):
        parts = load_conversations(
            specs, seed=data_args.seed, use_hf=use_hf, model_name=data_args.model_name,
            model_author=data_args.model_author, self_cognition_weight_zh=data_args.self_cognition_weight_zh,
            strict=strict, log=log,
        )
        for part in parts:
            report, kept = _process_part(part, role, tokenizer, data_args, system, fp, log)
            reports.append(report)
            if strict and not kept:
                raise UserError("; ".join(report.errors) or f"{part.location}: zero rows left")
            if role == "val":
                val += kept
                continue
            part_train, part_val = split_val(kept, _split_ratio(data_args, len(kept)), data_args.seed)
            report.train_rows, report.val_rows = len(part_train), len(part_val)
            train += part_train
            val += part_val
    if strict and not train:
        raise UserError("zero training rows left after loading and length filtering; see the report above")
    return TrainData(train=train, val=val, reports=reports, system=system)


def note_unused_identity(data_args, log) -> None:
    """--model_name/--model_author fill only the built-in self-cognition rows: say so when no dataset is those."""
    given = [f for f, v in (("--model_name", data_args.model_name), ("--model_author", data_args.model_author)) if v]
    specs = list(data_args.dataset) + list(data_args.val_dataset)
    if given and not any(parse_spec(s).name in SELF_COGNITION_NAMES for s in specs):
        log(f"note: {' and '.join(given)} only fill the {{{{NAME}}}}/{{{{AUTHOR}}}} placeholders of the built-in "
            f"self-cognition dataset, which no --dataset names, so they change nothing (add --dataset self-cognition).")


def _process_part(
    part: DatasetPart, role: str, tokenizer: PreTrainedTokenizerBase, data_args, system, fp, log
) -> tuple[DatasetReport, list[Rendered]]:
    report = DatasetReport(
        spec=part.spec, location=part.location, role=role, formats=part.formats, rows_read=part.rows_read,
        rows_sampled=len(part.conversations), errors=list(part.errors),
        rows_with_own_system=sum(1 for c in part.conversations if c.messages[0]["role"] == "system"),
        special_token_rows=rows_with_special_tokens(part.conversations, tokenizer),
    )
    if report.special_token_rows:
        log(f"warning: {len(report.special_token_rows)} row(s) of {part.location} contain special-token text such as "
            f"<|im_end|> (first: {report.special_token_rows[0]}); it is read as control tokens, not text")
    samples, report.cache_hit = render_part(
        part, tokenizer, system=system, loss_on_prompt=data_args.loss_on_prompt,
        num_proc=data_args.dataset_num_proc, use_cache=data_args.data_cache, tokenizer_fp=fp,
    )
    cut = truncate(samples, data_args.max_length, data_args.truncation_strategy)
    kept, report.dropped, report.truncated = cut.kept, cut.dropped, cut.truncated
    report.rows_kept = len(kept)
    report.lengths = length_stats(kept)
    report.loss_tokens = sum(s.num_loss_tokens for s in kept)
    report.loss_scales = dict(sorted(Counter(s.loss_scale for s in kept if s.loss_scale != 1.0).items()))
    if kept:
        report.example, report.example_messages = kept[0], part.conversations[cut.kept_index[0]].messages
    if report.dropped or report.truncated:
        reasons = "; ".join(f"{n} {why}" for why, n in report.dropped.items())
        log(f"{part.location}: {report.truncated} truncated, {sum(report.dropped.values())} dropped ({reasons or 'none'})")
    if not kept:
        msg = f"{part.location}: zero rows left (read {part.rows_read}, dropped {sum(report.dropped.values())})"
        if data_args.truncation_strategy == "delete" and report.dropped:
            msg += f"; rows are longer than --max_length {data_args.max_length}: raise it or use --truncation_strategy left"
        report.errors.append(msg)
    return report, kept


def rows_with_special_tokens(conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Sources of rows whose text contains a special token's spelling (the tokenizer reads it as a control token)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    specials = sorted(t for t in specials if t)
    if not specials:
        return []
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    return [c.source for c in conversations if any(pattern.search(m["content"]) for m in c.messages)]


def _split_ratio(data_args, n_rows: int) -> float:
    if data_args.split_dataset_ratio is not None:
        return data_args.split_dataset_ratio
    if data_args.val_dataset or n_rows < AUTO_SPLIT_MIN_ROWS:
        return 0.0
    return 0.01
