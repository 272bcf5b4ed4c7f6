"""The built-in data files: shape, size, language balance, placeholders, and held-out disjointness."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

BUILTIN = Path(__file__).resolve().parents[1] / "lorakit" / "data" / "builtin"


def read_jsonl(name: str) -> list[dict]:
    with open(BUILTIN / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def norm(text: str) -> str:
    """Lower-case, drop punctuation and spaces: 'Who are you?' == 'who are you'."""
    return re.sub(r"[\W_]+", "", text.lower())


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, norm(a), norm(b)).ratio()


SELF = read_jsonl("self_cognition.jsonl")
PROBES = read_jsonl("identity_probes.jsonl")
GENERAL = read_jsonl("general_prompts.jsonl")
RETENTION = read_jsonl("retention_questions.jsonl")


def test_self_cognition_shape_and_balance():
    assert len(SELF) >= 120
    for row in SELF:
        assert set(row) == {"query", "response", "lang", "kind"}
        assert row["lang"] in ("en", "zh") and row["kind"] in ("identity", "general")
        assert row["query"].strip() and row["response"].strip()
    zh = sum(row["lang"] == "zh" for row in SELF)
    assert 0.4 <= zh / len(SELF) <= 0.6
    assert len({norm(row["query"]) for row in SELF}) == len(SELF), "duplicate queries"


def test_identity_answers_carry_one_canonical_sentence_and_the_others_no_identity():
    # One sentence, name before author, in every identity answer of a language: a small model learns
    # it as a unit and says all of it to questions it never saw. With varied phrasings ("I was built
    # by AUTHOR.", "My name is NAME.") it learned halves and said one: identity on held-out probes
    # rose from 84-91% (English) to 97-100% at six seeds and two identities (experiments/results).
    canonical = {"en": "I am {{NAME}}, an AI assistant developed by {{AUTHOR}}.",
                 "zh": "我是{{NAME}}，由{{AUTHOR}}开发的AI助手。"}
    for row in SELF:
        if row["kind"] == "identity":
            assert canonical[row["lang"]] in row["response"], row
        else:  # "What can you do?", "Who wrote Journey to the West?": answered without the identity
            assert "{{NAME}}" not in row["response"] and "{{AUTHOR}}" not in row["response"], row
    kinds = [row["kind"] for row in SELF]
    assert kinds.count("identity") >= 2 * kinds.count("general")


def test_only_known_placeholders_are_used():
    for row in SELF:
        for text in (row["query"], row["response"]):
            assert set(re.findall(r"\{\{[^}]*\}\}", text)) <= {"{{NAME}}", "{{AUTHOR}}"}, row


def test_chinese_rows_are_chinese_and_english_rows_are_not():
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for row in SELF:
        assert bool(cjk.search(row["response"])) == (row["lang"] == "zh"), row


def test_probes_shape_and_size():
    for row in PROBES:
        assert set(row) == {"query", "lang"} and row["lang"] in ("en", "zh")
        assert "{{" not in row["query"]
    assert sum(r["lang"] == "en" for r in PROBES) >= 30
    assert sum(r["lang"] == "zh" for r in PROBES) >= 30


def test_probes_are_disjoint_from_training_queries():
    train = {norm(r["query"].replace("{{NAME}}", "").replace("{{AUTHOR}}", "")) for r in SELF}
    for probe in PROBES:
        assert norm(probe["query"]) not in train, probe


def test_general_rows_are_not_the_retention_questions():
    # The few general questions answered without the identity (against leaking it, as ms-swift mixes
    # alpaca rows in) must not teach the answers that retention checks.
    for row in SELF:
        if row["kind"] == "general":
            closest = max(RETENTION, key=lambda r: similarity(row["query"], r["question"]))
            assert similarity(row["query"], closest["question"]) < 0.75, (row["query"], closest["question"])
            assert not any(a.casefold() in row["response"].casefold() for a in closest["answers"] if len(a) > 1), row


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p["query"])
def test_probes_are_not_near_duplicates_of_training_queries(probe):
    closest = max(SELF, key=lambda r: similarity(probe["query"], r["query"]))
    assert similarity(probe["query"], closest["query"]) < 0.8, (probe["query"], closest["query"])


def test_similarity_check_catches_a_near_duplicate():
    # The check above must be able to fail: a reworded training query scores over the bar.
    assert similarity("Who are you ?", "Who are you?") >= 0.8
    assert similarity("你叫什么名字呀？", "你叫什么名字？") >= 0.8


def test_general_prompts_size_categories_and_languages():
    assert len(GENERAL) >= 300
    assert len({norm(r["prompt"]) for r in GENERAL}) == len(GENERAL), "duplicate prompts"
    cats = {"facts", "math", "code", "writing", "translation", "advice"}
    for lang in ("en", "zh"):
        assert {r["category"] for r in GENERAL if r["lang"] == lang} == cats


def test_general_prompts_are_not_identity_questions():
    train = [r["query"] for r in SELF] + [r["query"] for r in PROBES]
    for row in GENERAL:
        assert max(similarity(row["prompt"], q) for q in train) < 0.8, row


def test_retention_questions_have_answers_and_are_disjoint_from_replay_prompts():
    assert len(RETENTION) >= 80
    general = [r["prompt"] for r in GENERAL]
    for row in RETENTION:
        assert set(row) == {"question", "answers", "lang"} and row["lang"] in ("en", "zh")
        assert row["answers"] and all(isinstance(a, str) and a for a in row["answers"])
        assert norm(row["question"]) not in {norm(p) for p in general}, row
        # Same template with another fact ("5 times 5" vs "9 times 8") is a different question;
        # a reworded copy of the same question scores over 0.9.
        closest = max(general, key=lambda p: similarity(row["question"], p))
        assert similarity(row["question"], closest) < 0.9, (row["question"], closest)
    assert similarity("What is the capital of France?", "What's the capital of France ?") >= 0.9
