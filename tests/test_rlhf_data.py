"""Preference rows: every accepted shape, exact token-level rendering, errors with file:line, counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lorakit.args import DataArgs
from lorakit.data.render import IGNORE_INDEX, render_conversation, render_prompt
from lorakit.errors import UserError
from lorakit.rlhf.data import (
    RenderedCompletion,
    RenderedPair,
    collate_completions,
    collate_pairs,
    load_preference_data,
    parse_preference_row,
)

QWEN_DIR = Path(__file__).parent / "fixtures" / "qwen2.5-tokenizer"
PROMPT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(QWEN_DIR)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def load(qwen, path, rlhf_type="dpo", **data_kw):
    args = DataArgs(dataset=[str(path)], **data_kw)
    return load_preference_data(args, qwen, rlhf_type=rlhf_type, batch_size=2, log=lambda m: None)


@pytest.mark.parametrize("row, shape", [
    ({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}, "prompt/chosen/rejected"),
    ({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]}, "prompt/chosen/rejected (messages)"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "4"}],
      "rejected": PROMPT + [{"role": "assistant", "content": "5"}]}, "chosen/rejected (messages)"),
    ({"messages": PROMPT + [{"role": "assistant", "content": "4"}], "rejected_response": "5"},
     "messages+rejected_response"),
    ({"query": "What is 2+2?", "response": "4", "rejected_response": "5"}, "query/response/rejected_response"),
])
def test_every_pair_shape_gives_the_same_example(row, shape):
    ex = parse_preference_row(row, "f.jsonl:3")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.format) == (PROMPT, "4", "5", shape)


def test_system_and_history_become_turns():
    ex = parse_preference_row({"prompt": "And 3+3?", "chosen": "6", "rejected": "7", "system": "Be brief.",
                               "history": [["What is 2+2?", "4"]]}, "f:1")
    assert ex.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.mark.parametrize("row", [
    {"messages": PROMPT + [{"role": "assistant", "content": "4"}], "label": True},
    {"prompt": "What is 2+2?", "completion": "4", "label": True},
])
def test_kto_rows(row):
    ex = parse_preference_row(row, "f:1")
    assert (ex.prompt, ex.chosen, ex.rejected) == (PROMPT, "4", None)
    bad = parse_preference_row(dict(row, label=False), "f:1")
    assert (bad.chosen, bad.rejected) == (None, "4")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "f.jsonl:7: row has 'chosen' but no 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "f.jsonl:7: 'rejected' is empty"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "f.jsonl:7: 'chosen' is empty"),
    ({"messages": PROMPT + [{"role": "assistant", "content": "4"}], "rejected_response": ""},
     "f.jsonl:7: 'rejected_response' is empty"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "f.jsonl:7: 'label' must be true or false"),
    ({"query": "q", "response": "a"}, "f.jsonl:7: not a preference row; keys found: query, response"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "5"}]},
     "must share every turn but the last"),
])
def test_row_errors_name_file_and_line(row, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+").replace("?", r"\?")):
        parse_preference_row(row, "f.jsonl:7")


def test_rendering_matches_sft_and_inference_token_for_token(qwen, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five.",
                                               "history": [["Hi", "Hello!"]]}])
    (pair,) = load(qwen, path).train
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What is 2+2?"}]
    prompt_ids = render_prompt(qwen, prompt)
    for side, text in ((pair.chosen, "It is 4."), (pair.rejected, "Five.")):
        full = render_conversation(qwen, prompt + [{"role": "assistant", "content": text}])
        assert side.input_ids == full.input_ids
        assert side.input_ids[:len(prompt_ids)] == prompt_ids
        # loss only on the final answer and its end-of-turn token (not on the history's answer)
        assert side.labels == [IGNORE_INDEX] * len(prompt_ids) + full.labels[len(prompt_ids):]
        learned = [t for t in side.labels if t != IGNORE_INDEX]
        assert qwen.decode(learned) == text + "<|im_end|>"


def test_counts_drops_truncation_and_prompt_too_long(qwen, tmp_path):
    long_answer = " ".join(["word"] * 80)
    rows = [{"prompt": "q1", "chosen": "same", "rejected": "same"},
            {"prompt": "q2", "chosen": long_answer, "rejected": "short"},
            {"prompt": "q3", "chosen": "good", "rejected": "bad"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = load(qwen, path, max_length=60)
    (report,) = data.reports
    assert report.dropped == {"chosen == rejected (nothing to prefer)": 1,
                              "longer than --max_length 60 (--truncation_strategy delete)": 1}
    assert report.kept == 1 and len(data.train) == 1
    cut = load(qwen, path, max_length=60, truncation_strategy="right")
    assert cut.reports[0].truncated == 1 and len(cut.train) == 2
    assert max(len(p.chosen.input_ids) for p in cut.train) == 60
    write_jsonl(path, rows + [{"prompt": " ".join(["long"] * 80), "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match=rf"{path}:4: the prompt alone is \d+ tokens"):
        load(qwen, path, max_length=60)


def test_malformed_rows_are_listed_with_lines(qwen, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "q", "chosen": "a"}, {"prompt": "q", "rejected": "b"}])
    with pytest.raises(UserError) as err:
        load(qwen, path)
    assert f"{path}:2: row has 'chosen' but no 'rejected'" in str(err.value)
    assert f"{path}:3: row has 'rejected' but no 'chosen'" in str(err.value)


def test_kto_unpairs_pairs_and_rotates_kl_completions(qwen, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "chosen": "good one", "rejected": "bad one"},
                                              {"prompt": "q2", "completion": "fine", "label": True}])
    data = load(qwen, path, rlhf_type="kto")
    items = data.train
    assert [(type(x), x.desirable) for x in items] == [(RenderedCompletion, True), (RenderedCompletion, False),
                                                       (RenderedCompletion, True)]
    # chunk of 2: item 0 gets item 1's completion, item 1 gets item 0's; item 2 (alone) its own
    answer = lambda s: qwen.decode([t for t in s.labels if t != IGNORE_INDEX])  # noqa: E731
    assert [answer(x.kl) for x in items] == ["bad one<|im_end|>", "good one<|im_end|>", "fine<|im_end|>"]
    n = next(t for t, label in enumerate(items[0].completion.labels) if label != IGNORE_INDEX)
    assert items[0].kl.input_ids[:n] == items[0].completion.input_ids[:n]
    with pytest.raises(UserError, match="a KTO row"):
        load(qwen, path, rlhf_type="dpo")


def test_collate_puts_chosen_rows_first_and_shares_the_prompt(qwen, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?", "chosen": "Paris.",
                                               "rejected": "Lyon, I think."}])
    (pair,) = load(qwen, path).train
    pair.ref_chosen, pair.ref_rejected = -1.5, -2.5
    batch = collate_pairs([pair], qwen.pad_token_id)
    assert batch["input_ids"][0, :len(pair.chosen.input_ids)].tolist() == pair.chosen.input_ids
    assert batch["input_ids"][1, :len(pair.rejected.input_ids)].tolist() == pair.rejected.input_ids
    assert batch["ref_chosen"].tolist() == [-1.5] and batch["ref_rejected"].tolist() == [-2.5]
    shared = collate_pairs([pair], qwen.pad_token_id, shared_prefix=True)
    n = shared["prefix_ids"].shape[1]
    assert shared["prefix_ids"][0].tolist() == pair.chosen.input_ids[:n]
    assert n >= len(render_prompt(qwen, PROMPT)) - 2


def test_collate_completions_carries_kl_rows(qwen, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "completion": "yes", "label": True},
                                              {"prompt": "q2", "completion": "no", "label": False}])
    items = load(qwen, path, rlhf_type="kto").train
    for x in items:
        x.ref, x.ref_kl = -1.0, -2.0
    batch = collate_completions(items, qwen.pad_token_id)
    assert batch["desirable"].tolist() == [True, False]
    assert batch["kl_input_ids"].shape[0] == 2 and batch["ref_kl"].dtype == torch.float32
