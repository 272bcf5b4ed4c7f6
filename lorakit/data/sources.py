"""Where conversations come from: a dataset spec (PATH_OR_ID[#N]) read from a local file, a hub
dataset or the built-in self-cognition set, validated row by row and sampled to N rows."""

from __future__ import annotations

import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.data.files import DATA_SUFFIXES, Malformed, read_rows
from lorakit.data.formats import Conversation, detect_format, normalise_row
from lorakit.data.hub import hub_rows
from lorakit.data.system_prompts import training_system
from lorakit.errors import UserError
from lorakit.paths import BUILTIN_DIR, HUB_ID_PATTERN

SELF_COGNITION_FILE = BUILTIN_DIR / "self_cognition.jsonl"
SELF_COGNITION_NAMES = ("self-cognition", "swift/self-cognition", "self_cognition")
HUB_DATASET = re.compile(rf"^{HUB_ID_PATTERN}(:[\w.-]+)?$")  # org/name[:subset]
MAX_LISTED_ERRORS = 20


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
    use_hf: bool | None = None,
    model_name: list[str] | tuple[str, ...] = (),
    model_author: list[str] | tuple[str, ...] = (),
    self_cognition_weight_zh: float = 1.0,
    strict: bool = True,
    require_answer: bool = True,
    log=None,
) -> list[DatasetPart]:
    """Read and validate every spec; strict=True raises on any malformed row (listing up to 20).

    require_answer=False (batch inference) also accepts rows with no answer, ending in a user turn.
    self_cognition_weight_zh: the loss_scale of the built-in self-cognition's Chinese identity rows.
    """
    log = log or log_to_stderr
    parts = []
    for text in specs:
        spec = parse_spec(text)
        rows, location = _read_spec(spec.name, use_hf=use_hf, model_name=model_name, model_author=model_author,
                                    weight_zh=self_cognition_weight_zh)
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


def _read_spec(name: str, *, use_hf: bool | None, model_name, model_author,
               weight_zh: float = 1.0) -> tuple[list[tuple[dict, str]], str]:
    if name in SELF_COGNITION_NAMES:
        return _self_cognition_rows(model_name, model_author, weight_zh), "built-in self-cognition"
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if path.exists():
        return read_rows(path), str(path)
    if HUB_DATASET.match(name) and not name.endswith(DATA_SUFFIXES):
        return hub_rows(name, use_hf=use_hf, read_file=read_rows), name
    raise UserError(
        f"--dataset {name}: no such file: {path}. Relative paths resolve against the current directory "
        f"({Path.cwd()}); hub datasets are written org/name; the built-in one is 'self-cognition'."
    )


def _self_cognition_rows(model_name, model_author, weight_zh: float = 1.0) -> list[tuple[dict, str]]:
    """The built-in identity rows with {{NAME}}/{{AUTHOR}} filled ([zh, en] pairs as in ms-swift), each under
    the system prompt data/system_prompts.py gives its line (none: the run's own), so the identity holds
    under the system prompts a deployment sets, not only under the one training used. The Chinese identity
    rows get loss_scale `weight_zh` (--self_cognition_weight_zh)."""
    names, authors = _pair(model_name, "--model_name"), _pair(model_author, "--model_author")
    missing = [flag for flag, v in (("--model_name", names), ("--model_author", authors)) if v is None]
    if missing:
        raise UserError(
            f"the built-in self-cognition dataset needs {' and '.join(missing)}, e.g. "
            "--model_name 小助手 'Little Helper' --model_author 张三 'Zhang San' (one value, or a Chinese and an English one)."
        )
    rows = []
    for index, (row, source) in enumerate(read_rows(SELF_COGNITION_FILE)):
        k = 0 if row.get("lang") == "zh" else 1
        fill = {"{{NAME}}": names[k], "{{AUTHOR}}": authors[k]}
        filled = {}
        for key in ("query", "response"):
            text = row[key]
            for placeholder, value in fill.items():
                text = text.replace(placeholder, value)
            filled[key] = text
        system = training_system(index)
        if system is not None:
            filled["system"] = system
        if k == 0 and row.get("kind") == "identity" and weight_zh != 1.0:
            filled["loss_scale"] = weight_zh
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


def _normalise(row: object, source: str, require_answer: bool) -> Conversation:
    if isinstance(row, Malformed):
        raise UserError(f"{source}: {row.problem}")
    return normalise_row(row, source, require_answer=require_answer)


def log_to_stderr(message: str) -> None:
    """The default progress log of data loading: one line on stderr."""
    print(message, file=sys.stderr, flush=True)
