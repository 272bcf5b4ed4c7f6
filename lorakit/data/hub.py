"""Rows of a hub dataset: ModelScope by default (as ms-swift), the Hugging Face hub with --use_hf true.

Either hub is asked once, after a 3-second check that its host answers at all: offline, the
user learns it at once instead of after the libraries' own retries (31 s on the HF hub).
ModelScope datasets are downloaded as files (modelscope's snapshot download) and read with the
same readers as local files, so every row keeps a 'file:line' source.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from lorakit.errors import UserError

PROBE_TIMEOUT_S = 3.0
DATA_FILES = (".jsonl", ".json", ".csv", ".parquet")
OTHER_SPLITS = ("test", "validation", "valid", "dev", "eval")
Rows = list[tuple[object, str]]


def hub_host(use_hf: bool) -> str:
    """The host the hub's library talks to (HF_ENDPOINT / MODELSCOPE_DOMAIN respected)."""
    if use_hf:
        return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    domain = os.environ.get("MODELSCOPE_DOMAIN") or "www.modelscope.cn"
    return urlparse(domain if "://" in domain else f"https://{domain}").hostname or domain


def unreachable(host: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `host`:443 cannot be reached within `timeout` seconds, or None when it answers."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def hub_rows(name: str, *, use_hf: bool | None, read_file: Callable[[Path], Rows]) -> Rows:
    """Rows of the train split of hub dataset `name` ('org/name' or 'org/name:subset')."""
    repo, _, subset = name.partition(":")
    if use_hf is True:
        return _hf_rows(name, repo, subset or None)
    return _modelscope_rows(name, repo, subset or None, use_hf, read_file)


def check_reachable(name: str, hf: bool) -> None:
    """One quick connection to the hub's host; offline is a UserError at once, naming the way out."""
    hub = "the Hugging Face hub" if hf else "ModelScope"
    offline = hf and os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    why = "offline mode is set" if offline else unreachable(hub_host(hf))
    if why is not None:
        other = "--use_hf false for ModelScope" if hf else "--use_hf true for the Hugging Face hub"
        raise UserError(
            f"--dataset {name}: {hub} cannot be reached ({hub_host(hf)}: {why}). Download the dataset on a machine "
            f"with network access and pass the local file (.json/.jsonl/.csv/.parquet) instead, or try {other}."
        )


def _hf_rows(name: str, repo: str, subset: str | None) -> Rows:
    try:
        import datasets
    except ImportError:
        raise UserError(f"--dataset {name}: reading hub datasets needs the `datasets` package: pip install datasets") from None
    check_reachable(name, hf=True)
    try:
        ds = datasets.load_dataset(repo, subset, split="train")
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"--dataset {name}: could not load it from the Hugging Face hub: {type(e).__name__}: {e}. "
            "The ID may be wrong; use a local file path instead, or --use_hf false for ModelScope."
        ) from None
    return [(dict(row), f"{name}[{i}]") for i, row in enumerate(ds)]


def _modelscope_rows(name: str, repo: str, subset: str | None, use_hf: bool | None, read_file) -> Rows:
    flag = "--use_hf false" if use_hf is False else "a hub dataset ID (ModelScope by default, as in ms-swift)"
    try:
        from modelscope import dataset_snapshot_download
    except ImportError:
        raise UserError(f"--dataset {name}: {flag} needs the modelscope package: pip install modelscope "
                        "(or --use_hf true for the Hugging Face hub).") from None
    check_reachable(name, hf=False)
    try:
        folder = Path(dataset_snapshot_download(repo, allow_patterns=[f"*{s}" for s in DATA_FILES] + ["*.md"]))
    except Exception as e:  # the client raises many types (HTTP, auth, not found); all mean the same here
        raise UserError(
            f"--dataset {name}: could not download it from ModelScope: {type(e).__name__}: {e}. The ID may be "
            "wrong (ModelScope IDs look like AI-ModelScope/alpaca-gpt4-data-zh); use a local file path instead, "
            "or --use_hf true for the Hugging Face hub."
        ) from None
    files = train_files(folder, subset)
    if not files:
        raise UserError(f"--dataset {name}: the ModelScope download ({folder}) has no train data file "
                        f"({', '.join(DATA_FILES)}){f' for subset {subset!r}' if subset else ''}.")
    return [row for f in files for row in read_file(f)]


def train_files(folder: Path, subset: str | None) -> list[Path]:
    """The data files of a downloaded dataset that hold its train split (of `subset` when given)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_FILES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if subset:
        files = [p for p in files if subset in p.relative_to(folder).parts[:-1] or p.stem == subset] or files
    named_train = [p for p in files if "train" in p.name.lower()]
    if named_train:
        return named_train
    return [p for p in files if not any(s in p.stem.lower() for s in OTHER_SPLITS)]
