"""Reading local data files (.jsonl, .json, .csv, .parquet): every row comes back with its "file:line"
source, and a row that cannot be parsed comes back as `Malformed` so the caller reports it there."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lorakit.data.formats import detect_format
from lorakit.errors import UserError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


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
            rows.append((Malformed(f"malformed JSON: {e.msg} at column {e.colno}"), f"{path}:{lineno}"))
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
            rows.append((Malformed(f"{len(row[None])} more cells than the header has columns"), f"{path}:{reader.line_num}"))
            continue
        clean = {k: v for k, v in row.items() if v is not None and v != ""}
        for key in ("messages", "conversations", "history"):
            if isinstance(clean.get(key), str) and clean[key].lstrip().startswith("["):
                try:
                    clean[key] = json.loads(clean[key])
                except json.JSONDecodeError as e:
                    clean = Malformed(f"column '{key}' is not valid JSON: {e.msg}")
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


class Malformed(dict):
    """A row that could not be parsed; normalise_row reports it with its source."""

    def __init__(self, problem: str):
        super().__init__()
        self.problem = problem
