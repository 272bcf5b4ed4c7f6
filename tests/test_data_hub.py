"""Hub dataset IDs: ModelScope by default (as ms-swift), one quick attempt, a clear error offline."""

from __future__ import annotations

import sys
import time
import types

import pytest

from lorakit.data import hub
from lorakit.data.files import read_rows
from lorakit.data.loading import load_conversations
from lorakit.errors import UserError

INVALID = "modelscope.invalid"  # .invalid never resolves (RFC 2606): offline, whatever the machine


def test_offline_modelscope_fails_at_once_with_the_way_out(monkeypatch):
    from modelscope import dataset_snapshot_download  # noqa: F401  (imported first: the timing is the network's)

    monkeypatch.setenv("MODELSCOPE_DOMAIN", INVALID)
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_conversations(["AI-ModelScope/alpaca-gpt4-data-zh#500"])  # no use_hf: ms-swift's default hub
    assert time.perf_counter() - started < hub.PROBE_TIMEOUT_S + 2
    message = str(err.value)
    assert message.startswith("--dataset AI-ModelScope/alpaca-gpt4-data-zh: ModelScope cannot be reached "
                              f"({INVALID}: ")
    assert "pass the local file (.json/.jsonl/.csv/.parquet) instead, or try --use_hf true" in message


def test_offline_hf_hub_fails_at_once(monkeypatch):
    import datasets  # noqa: F401  (imported first: the timing is the network's)

    monkeypatch.setenv("HF_ENDPOINT", "https://hf.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"the Hugging Face hub cannot be reached \(hf.invalid: .*--use_hf false"):
        load_conversations(["tatsu-lab/alpaca#5"], use_hf=True)
    assert time.perf_counter() - started < hub.PROBE_TIMEOUT_S + 2


def test_modelscope_dataset_read_from_its_train_file(monkeypatch, tmp_path):
    """The downloaded snapshot's train file is read like a local one (sources are file:line)."""
    (tmp_path / "train.jsonl").write_text('{"query": "q1", "response": "a1"}\n{"query": "q2", "response": "a2"}\n')
    (tmp_path / "test.jsonl").write_text('{"query": "t", "response": "t"}\n')
    asked = []
    fake = types.ModuleType("modelscope")
    fake.dataset_snapshot_download = lambda repo, **kw: asked.append(repo) or str(tmp_path)
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    monkeypatch.setattr(hub, "unreachable", lambda host, timeout=hub.PROBE_TIMEOUT_S: None)
    part = load_conversations(["AI-ModelScope/some-data"])[0]
    assert asked == ["AI-ModelScope/some-data"]
    assert [c.messages[-1]["content"] for c in part.conversations] == ["a1", "a2"]
    assert part.conversations[1].source == f"{tmp_path / 'train.jsonl'}:2"
    assert hub.train_files(tmp_path, None) == [tmp_path / "train.jsonl"]
    assert read_rows(tmp_path / "train.jsonl")[0][1].endswith("train.jsonl:1")
