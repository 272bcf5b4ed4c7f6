"""Dataset specs -> conversations -> rendered train/val samples, with a report per dataset.

A spec is PATH_OR_ID[#N]: a local .json/.jsonl/.csv/.parquet file (relative paths resolve
against the current directory), a hub dataset ID (org/name[:subset]), or the built-in
`self-cognition` (ms-swift: `swift/self-cognition`). #N samples N rows with --seed, repeating
reshuffled copies when N exceeds the dataset. Nothing is skipped silently: malformed rows are
errors with file:line, dropped or truncated samples are counted with their reason.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.data import cache
from lorakit.data.formats import Conversation, detect_format, normalise_row
from lorakit.data.render import Rendered, render_conversations, set_chat_template, strip_system_markers
from lorakit.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"
SELF_COGNITION_FILE = BUILTIN_DIR / "self_cognition.jsonl"
SELF_COGNITION_NAMES = ("self-cognition", "swift/self-cognition", "self_cognition")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
MAX_LISTED_ERRORS = 20
AUTO_SPLIT_MIN_ROWS = 500  # below this, --split_dataset_ratio defaults to 0 (a tiny identity set stays whole)


@dataclass
class DatasetPart:
    """One spec's conversations after validation and #N sampling."""

    spec: str
    location: str  # absolute path, hub ID, or "built-in self-cognition"
    conversations: list[Conversation]
    rows_read: int  # rows in the source, before sampling
    formats: dict[str, int]  # detected shape -> rows
    errors: list[str] = field(default_factory=list)  # "file:line: what is wrong"


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


@dataclass
class DatasetSpec:
    text: str
    name: str
    n: int | None


def parse_spec(text: str) -> DatasetSpec:
    """Split 'PATH_OR_ID#N' into name and sample size (a '#' not followed by digits belongs to the name)."""
    name, sep, n = text.rpartition("#")
    if sep and n.isdigit():
        if int(n) <= 0:
            raise UserError(f"--dataset {text}: #N must be a positive number of rows")
        return DatasetSpec(text=text, name=name, n=int(n))
    return DatasetSpec(text=text, name=text, n=None)


def load_conversations(
    specs: list[str],
    *,
    seed: int = 42,
    use_hf: bool = True,
    model_name: list[str] | tuple[str, ...] = (),
    model_author: list[str] | tuple[str, ...] = (),
    strict: bool = True,
    require_answer: bool = True,
    log=None,
) -> list[DatasetPart]:
    """Read and validate every spec; strict=True raises on any malformed row (listing up to 20).

    require_answer=False (batch inference) also accepts rows with no answer, ending in a user turn.
    """
    log = log or _log
    parts = []
    for text in specs:
        spec = parse_spec(text)
        rows, location = _read_spec(spec.name, use_hf=use_hf, model_name=model_name, model_author=model_author)
        log(f"loaded {len(rows)} rows from {location}")
        conversations, errors, formats = [], [], Counter()
        for row, source in rows:
            try:
                conversations.append(_normalise(row, source, require_answer))
                formats[detect_format(row, require_answer=require_answer)] += 1
            except UserError as e:
                errors.append(str(e))
        if strict:
            raise_row_errors(errors, location)
        if spec.n is not None and conversations:
            if spec.n > len(conversations):
                low, high = spec.n // len(conversations), -(-spec.n // len(conversations))
                times = f"{low}" if low == high else f"{low} or {high}"
                log(f"note: {text} asks for {spec.n} rows of {len(conversations)}: oversampled, each row used "
                    f"{times} times")
            conversations = sample_rows(conversations, spec.n, seed)
        parts.append(DatasetPart(text, location, conversations, len(rows), dict(formats), errors))
    return parts


def raise_row_errors(errors: list[str], location: str) -> None:
    """Raise one UserError listing up to 20 malformed rows of a dataset, then a count."""
    if not errors:
        return
    listed = "\n  ".join(errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    raise UserError(f"{len(errors)} malformed row(s) in {location}:\n  {listed}{more}\nFix or remove them and re-run.")


def sample_rows(items: list, n: int, seed: int) -> list:
    """N items chosen with `seed`: a sample without repeats, or whole reshuffled copies plus a sample."""
    rng = random.Random(seed)
    out: list = []
    while n - len(out) >= len(items):
        copy = list(items)
        rng.shuffle(copy)
        out += copy
    return out + rng.sample(items, n - len(out))


def _read_spec(name: str, *, use_hf: bool, model_name, model_author) -> tuple[list[tuple[dict, str]], str]:
    if name in SELF_COGNITION_NAMES:
        return _self_cognition_rows(model_name, model_author), "built-in self-cognition"
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if path.exists():
        return read_rows(path), str(path)
    if _HUB_ID.match(name) and not name.endswith(DATA_SUFFIXES):
        return _hub_rows(name, use_hf=use_hf), name
    raise UserError(
        f"--dataset {name}: no such file: {path}. Relative paths resolve against the current directory "
        f"({Path.cwd()}); hub datasets are written org/name; the built-in one is 'self-cognition'."
    )


def _self_cognition_rows(model_name, model_author) -> list[tuple[dict, str]]:
    """The built-in identity rows with {{NAME}}/{{AUTHOR}} filled ([zh, en] pairs as in ms-swift)."""
    names, authors = _pair(model_name, "--model_name"), _pair(model_author, "--model_author")
    missing = [flag for flag, v in (("--model_name", names), ("--model_author", authors)) if v is None]
    if missing:
        raise UserError(
            f"the built-in self-cognition dataset needs {' and '.join(missing)}, e.g. "
            "--model_name 小助手 'Little Helper' --model_author 张三 'Zhang San' (one value, or a Chinese and an English one)."
        )
    rows = []
    for row, source in read_rows(SELF_COGNITION_FILE):
        k = 0 if row.get("lang") == "zh" else 1
        fill = {"{{NAME}}": names[k], "{{AUTHOR}}": authors[k]}
        filled = {}
        for key in ("query", "response"):
            text = row[key]
            for placeholder, value in fill.items():
                text = text.replace(placeholder, value)
            filled[key] = text
        rows.append((filled, f"built-in self-cognition:{source.rsplit(':', 1)[-1]}"))
    return rows


def _pair(values, flag: str) -> tuple[str, str] | None:
    if isinstance(values, str):
        values = [values]
    values = [v for v in (values or []) if v and v.strip()]
    if not values:
        return None
    if len(values) > 2:
        raise UserError(f"{flag} takes one value, or a Chinese and an English value; got {len(values)}")
    return (values[0], values[-1])


def _hub_rows(name: str, *, use_hf: bool) -> list[tuple[dict, str]]:
    """Rows of the train split of a hub dataset (Hugging Face with use_hf, else ModelScope)."""
    repo, _, subset = name.partition(":")
    subset = subset or None
    if use_hf:
        try:
            import datasets
        except ImportError:
            raise UserError(f"--dataset {name}: reading hub datasets needs the `datasets` package: pip install datasets") from None
        try:
            ds = datasets.load_dataset(repo, subset, split="train")
        except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise UserError(
                f"--dataset {name}: could not load it from the Hugging Face hub: {type(e).__name__}: {e}. "
                "The hub may be unreachable (offline?) or the ID may be wrong; use a local file path instead, "
                "or --use_hf false for ModelScope."
            ) from None
    else:
        try:
            from modelscope.msdatasets import MsDataset
        except ImportError:
            raise UserError(f"--dataset {name}: --use_hf false needs the modelscope package: pip install modelscope") from None
        try:
            ds = MsDataset.load(repo, subset_name=subset, split="train")
        except (ConnectionError, OSError, ValueError) as e:
            raise UserError(
                f"--dataset {name}: could not load it from ModelScope: {type(e).__name__}: {e}. "
                "ModelScope may be unreachable (offline?) or the ID may be wrong; use a local file path instead."
            ) from None
    return [(dict(row), f"{name}[{i}]") for i, row in enumerate(ds)]


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
    tokenizer,
    *,
    system: str | None,
    loss_on_prompt: bool,
    num_proc: int = 1,
    use_cache: bool = True,
    tokenizer_fp: str | None = None,
) -> tuple[list[Rendered], bool]:
    """Render one dataset's conversations (in `num_proc` processes, from the disk cache when possible)."""
    messages = [c.messages for c in part.conversations]
    key = None
    if use_cache and messages:
        fp = tokenizer_fp or cache.tokenizer_fingerprint(tokenizer)
        key = cache.cache_key(messages, tokenizer_fp=fp, system=system, loss_on_prompt=loss_on_prompt)
        hit = cache.load_cached(key)
        if hit is not None and len(hit) == len(messages):
            return hit, True
    sources = [c.source for c in part.conversations]
    samples = _render_parallel(tokenizer, messages, sources, system, loss_on_prompt, num_proc)
    if key is not None:
        cache.save_cached(key, samples)
    return samples, False


_WORKER: dict = {}


def _render_chunk(bounds: tuple[int, int]) -> list[Rendered]:
    a, b = bounds
    w = _WORKER
    return render_conversations(
        w["tokenizer"], w["messages"][a:b], system=w["system"], loss_on_prompt=w["loss_on_prompt"], sources=w["sources"][a:b]
    )


def _render_parallel(tokenizer, messages, sources, system, loss_on_prompt, num_proc) -> list[Rendered]:
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
            s = Rendered(input_ids=s.input_ids[cut], labels=s.labels[cut])
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
    data_args, tokenizer, *, use_hf: bool = True, template: str | None = None, strict: bool = True, log=None
) -> TrainData:
    """Load, validate, render, truncate and split every --dataset/--val_dataset; a report per dataset.

    `template` is --template: it is applied to `tokenizer` (set_chat_template) before rendering, so
    save that tokenizer with the checkpoint. strict=False (check-data) keeps going past malformed
    rows and empty datasets, recording them in the reports; strict=True raises UserError on either.
    """
    log = log or _log
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
            model_author=data_args.model_author, strict=strict, log=log,
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
    part: DatasetPart, role: str, tokenizer, data_args, system, fp, log
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


def rows_with_special_tokens(conversations: list[Conversation], tokenizer) -> list[str]:
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


# ---- reading local files: every row comes back with its "file:line" source ----


def read_rows(path: Path) -> list[tuple[object, str]]:
    """Rows of a local data file with their sources; file-level problems raise UserError."""
    if path.is_dir():
        raise UserError(
            f"{path} is a directory; --dataset takes a data file ({', '.join(DATA_SUFFIXES)}), e.g. {path}/train.jsonl"
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".json", ".jsonl", ".csv"):
        raise UserError(f"{path}: unsupported file type '{suffix}'; use {', '.join(DATA_SUFFIXES)}")
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty; it needs at least one row")
    if suffix == ".jsonl" or (suffix == ".json" and text.lstrip()[0] not in "[{"):
        rows = _read_jsonl(path, text)
    elif suffix == ".json":
        rows = _read_json(path, text)
    else:
        rows = _read_csv(path, text)
    if not rows:
        raise UserError(f"{path}: the file holds no rows")
    return rows


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is fine
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8 "
            "(e.g. iconv -f GBK -t UTF-8 in.json > out.json)"
        ) from None


def _read_jsonl(path: Path, text: str) -> list[tuple[object, str]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as e:
            rows.append((_Malformed(f"malformed JSON: {e.msg} at column {e.colno}"), f"{path}:{lineno}"))
    return rows


def _read_json(path: Path, text: str) -> list[tuple[object, str]]:
    """A list of rows (each tagged with the line it starts on), an object holding one list, or one row."""
    decoder = json.JSONDecoder()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json name
            return _read_jsonl(path, text)
        raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
    if isinstance(data, list):
        rows, pos = [], text.index("[") + 1
        for _ in data:
            pos = _skip(text, pos)
            item, end = decoder.raw_decode(text, pos)
            rows.append((item, f"{path}:{text.count(chr(10), 0, pos) + 1}"))
            pos = _skip(text, end) + 1  # past the comma
        return rows
    if isinstance(data, dict) and detect_format(data) is None:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{path}: a .json file must hold a list of rows, or an object with exactly one list of rows; "
                f"found keys {', '.join(map(str, data)) or '(none)'}"
            )
        key = lists[0]
        return [(row, f"{path} ({key}[{i}])") for i, row in enumerate(data[key])]
    return [(data, f"{path}:1")]


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path, text: str) -> list[tuple[object, str]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for row in reader:
        if None in row:
            rows.append((_Malformed(f"{len(row[None])} more cells than the header has columns"), f"{path}:{reader.line_num}"))
            continue
        clean = {k: v for k, v in row.items() if v is not None and v != ""}
        for key in ("messages", "conversations", "history"):
            if isinstance(clean.get(key), str) and clean[key].lstrip().startswith("["):
                try:
                    clean[key] = json.loads(clean[key])
                except json.JSONDecodeError as e:
                    clean = _Malformed(f"column '{key}' is not valid JSON: {e.msg}")
                    break
        rows.append((clean, f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[tuple[object, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as parquet: {e}") from None
    return [(row, f"{path}:row {i + 1}") for i, row in enumerate(table.to_pylist())]


class _Malformed(dict):
    """A row that could not be parsed; normalise_row reports it with its source."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem


def _normalise(row: object, source: str, require_answer: bool) -> Conversation:
    if isinstance(row, _Malformed):
        raise UserError(f"{source}: {row.problem}")
    return normalise_row(row, source, require_answer=require_answer)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
