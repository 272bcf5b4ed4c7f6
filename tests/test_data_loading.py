"""Reading files/hub/built-in data, #N sampling, bad inputs, truncation, splits, cache, parallel rendering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.args import DataArgs
from lorakit.data.loading import SELF_COGNITION_FILE, build_datasets, load_conversations, parse_spec, sample_rows
from lorakit.data.render import IGNORE_INDEX, render_conversation, render_prompt
from lorakit.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
QWEN_DIR = FIXTURES / "qwen2.5-tokenizer"
TUTORIAL = FIXTURES / "self_cognition.json"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(QWEN_DIR)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_of(n, prefix="q"):
    return [{"query": f"{prefix}{i}", "response": f"answer {i}"} for i in range(n)]


def one(specs, **kw):
    (part,) = load_conversations(specs, log=lambda m: None, **kw)
    return part


# ---- reading ----

def test_tutorial_file_loads_8_rows_and_renders(qwen, capsys):
    (part,) = load_conversations([str(TUTORIAL)])
    assert f"loaded 8 rows from {TUTORIAL.resolve()}" in capsys.readouterr().err
    assert part.location == str(TUTORIAL.resolve()) and part.formats == {"alpaca": 8}
    assert [c.source for c in part.conversations][:2] == [f"{TUTORIAL.resolve()}:1", f"{TUTORIAL.resolve()}:2"]
    first = part.conversations[0].messages
    assert first == [{"role": "user", "content": "你是谁？"},
                     {"role": "assistant", "content": "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。"}]
    for conv in part.conversations:
        r = render_conversation(qwen, conv.messages)
        prompt = render_prompt(qwen, conv.messages[:1])
        assert r.input_ids[: len(prompt)] == prompt
        learned = qwen.decode([t for t, l in zip(r.input_ids, r.labels) if l != IGNORE_INDEX])
        assert learned == conv.messages[1]["content"] + "<|im_end|>"


def test_relative_path_resolves_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", rows_of(3))
    monkeypatch.chdir(tmp_path)
    part = one(["sub/d.jsonl"])
    assert part.location == str((tmp_path / "sub" / "d.jsonl").resolve())
    assert len(part.conversations) == 3


@pytest.mark.parametrize("spec", ["missing.jsonl", "data/missing.json", "./org/name"])
def test_missing_path_shows_absolute_path_and_never_goes_to_the_hub(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        one([spec])
    assert "no such file" in str(e.value) and str((tmp_path / spec).resolve()) in str(e.value)


def test_json_object_holding_a_list_and_csv_and_parquet(tmp_path):
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": rows_of(2)}), encoding="utf-8")
    part = one([str(obj)])
    assert [c.messages[0]["content"] for c in part.conversations] == ["q0", "q1"]
    assert part.conversations[1].source.endswith("obj.json (data[1])")

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('instruction,input,output\n"Say ""hi""",,hello\nAdd,1+1,2\n', encoding="utf-8")
    part = one([str(csv_path)])
    assert part.formats == {"alpaca": 2}
    assert part.conversations[1].messages[0]["content"] == "Add\n1+1"
    assert part.conversations[0].messages[0]["content"] == 'Say "hi"'
    assert part.conversations[1].source == f"{csv_path}:3"

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows_of(3)), tmp_path / "d.parquet")
    part = one([str(tmp_path / "d.parquet")])
    assert len(part.conversations) == 3 and part.formats == {"query-response": 3}


def test_every_format_in_one_jsonl_file(tmp_path):
    rows = [
        {"instruction": "i", "input": "", "output": "o"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"query": "q", "response": "a"},
        {"prompt": "q", "response": "a"},
        {"prompt": "q", "completion": "a"},
        {"question": "q", "answer": "a"},
    ]
    part = one([str(write_jsonl(tmp_path / "mixed.jsonl", rows))])
    assert part.formats == {"alpaca": 1, "sharegpt": 1, "messages": 1, "query-response": 1,
                            "prompt-response": 1, "prompt-completion": 1, "question-answer": 1}


def test_jsonl_saved_as_json_still_loads(tmp_path):
    path = tmp_path / "lines.json"
    write_jsonl(path, rows_of(2))
    assert len(one([str(path)]).conversations) == 2


# ---- bad input ----

def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "response": "a"}\n{"query": "q", "response": \n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        one([str(path)])
    assert f"{path}:2: malformed JSON" in str(e.value)
    # check-data mode keeps the good row and lists the bad one.
    part = one([str(path)], strict=False)
    assert len(part.conversations) == 1 and part.errors[0].startswith(f"{path}:2:")


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"query": "q", "response": "a"},\n{"query": "q" "response": "a"}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}:3: malformed JSON"):
        one([str(path)])


def test_wrong_types_empty_content_and_no_assistant_are_listed_with_lines(tmp_path):
    rows = [{"query": "q", "response": "a"}, {"query": "q", "response": 5}, {"query": "q", "response": ""},
            {"messages": [{"role": "user", "content": "q"}]}, {"text": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as e:
        one([str(path)])
    message = str(e.value)
    assert "4 malformed row(s)" in message
    for line, what in [(2, "must be a string"), (3, "is empty"), (4, "no assistant turn"), (5, "keys found: text")]:
        assert f"{path}:{line}: " in message and what in message


def test_more_than_20_errors_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": i} for i in range(25)])
    with pytest.raises(UserError, match=r"25 malformed row\(s\)[\s\S]*\.\.\. and 5 more"):
        one([str(path)])


def test_utf8_bom_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows_of(2), ensure_ascii=False).encode("utf-8"))
    assert len(one([str(path)]).conversations) == 2
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(rows_of(1)[0]) + "\n").encode())
    assert len(one([str(jl)]).conversations) == 1


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(b'{"query": "q", "response": "a"}\n' + '{"query": "你好", "response": "a"}\n'.encode("gbk"))
    with pytest.raises(UserError, match=rf"{path}:2: not valid UTF-8"):
        one([str(path)])


@pytest.mark.parametrize("content", [b"", b"  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"{path}: the file is empty"):
        one([str(path)])


def test_empty_json_list(tmp_path):
    path = tmp_path / "none.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(UserError, match="holds no rows"):
        one([str(path)])


def test_directory_given_as_a_file(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path} is a directory"):
        one([str(tmp_path)])


def test_hub_id_offline_names_the_id(tmp_path):
    code = ("from lorakit.data.loading import load_conversations\n"
            "from lorakit.errors import UserError\n"
            "for use_hf in (None, True):\n"
            "    try:\n        load_conversations(['nobody-here/no-such-dataset'], use_hf=use_hf)\n"
            "    except UserError as e:\n        print('USERERROR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               MODELSCOPE_DOMAIN="modelscope.invalid", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "USERERROR --dataset nobody-here/no-such-dataset: ModelScope cannot be reached (modelscope.invalid" in out.stdout
    assert ("USERERROR --dataset nobody-here/no-such-dataset: the Hugging Face hub cannot be reached "
            "(huggingface.co: offline mode is set)") in out.stdout


# ---- specs and sampling ----

def test_parse_spec():
    assert (parse_spec("data.jsonl#50").name, parse_spec("data.jsonl#50").n) == ("data.jsonl", 50)
    assert (parse_spec("a#b.json").name, parse_spec("a#b.json").n) == ("a#b.json", None)
    with pytest.raises(UserError, match="positive"):
        parse_spec("x.json#0")


def test_sampling_is_deterministic_and_repeats_when_n_exceeds_size(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", rows_of(10)))
    a = [c.messages[0]["content"] for c in one([f"{path}#4"], seed=1).conversations]
    b = [c.messages[0]["content"] for c in one([f"{path}#4"], seed=1).conversations]
    c = [c.messages[0]["content"] for c in one([f"{path}#4"], seed=2).conversations]
    assert a == b and a != c and len(set(a)) == 4
    big = [c.messages[0]["content"] for c in one([f"{path}#25"], seed=1).conversations]
    counts = Counter(big)
    assert len(big) == 25 and set(counts) == {f"q{i}" for i in range(10)}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    assert sample_rows(list(range(10)), 25, 1)[:10] != list(range(10))  # copies are reshuffled


def test_self_cognition_needs_flags_and_fills_placeholders():
    with pytest.raises(UserError, match="--model_name and --model_author"):
        one(["self-cognition"])
    part = one(["swift/self-cognition"], model_name=["小乐", "Lele"], model_author=["乐团", "LeTeam"])
    assert len(part.conversations) >= 120
    text = json.dumps([c.messages for c in part.conversations], ensure_ascii=False)
    assert "{{" not in text and "Lele" in text and "小乐" in text and "LeTeam" in text
    # a row may start with its own system prompt (lorakit/data/system_prompts.py): the question and answer end it
    zh = [c for c in part.conversations if any("\u4e00" <= ch <= "\u9fff" for ch in c.messages[-2]["content"])]
    assert zh and all("Lele" not in c.messages[-1]["content"] for c in zh)
    single = one(["self-cognition#50"], model_name=["Bob"], model_author=["Ann"], seed=3)
    again = one(["self-cognition#50"], model_name=["Bob"], model_author=["Ann"], seed=3)
    assert len(single.conversations) == 50 and single.conversations == again.conversations


# ---- build_datasets ----

def args(**kw) -> DataArgs:
    return DataArgs(**kw)


def test_build_reports_truncation_and_drops(qwen, tmp_path):
    rows = rows_of(4) + [{"query": "long " * 200, "response": "short"}]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    data = build_datasets(args(dataset=[path], max_length=80), qwen, log=lambda m: None)
    (rep,) = data.reports
    assert rep.rows_read == 5 and rep.rows_kept == 4 and len(data.train) == 4
    assert rep.dropped == {"longer than --max_length 80 (--truncation_strategy delete)": 1}
    assert rep.loss_tokens == sum(s.num_loss_tokens for s in data.train)
    assert rep.lengths.max <= 80 and rep.lengths.min == min(len(s.input_ids) for s in data.train)

    left = build_datasets(args(dataset=[path], max_length=80, truncation_strategy="left"), qwen, log=lambda m: None)
    assert left.reports[0].truncated == 1 and len(left.train) == 5
    assert max(len(s.input_ids) for s in left.train) == 80

    right = build_datasets(args(dataset=[path], max_length=80, truncation_strategy="right"), qwen, log=lambda m: None)
    assert right.reports[0].dropped == {"no answer tokens left after --truncation_strategy right to 80": 1}


def test_zero_rows_left_is_an_error(qwen, tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", rows_of(3)))
    with pytest.raises(UserError, match="zero rows left"):
        build_datasets(args(dataset=[path], max_length=5), qwen, log=lambda m: None)


def test_val_split_defaults_and_val_dataset(qwen, tmp_path):
    small = str(write_jsonl(tmp_path / "small.jsonl", rows_of(100)))
    big = str(write_jsonl(tmp_path / "big.jsonl", rows_of(600)))
    data = build_datasets(args(dataset=[small]), qwen, log=lambda m: None)
    assert (len(data.train), len(data.val)) == (100, 0)  # a small set is not eaten by a split
    data = build_datasets(args(dataset=[big]), qwen, log=lambda m: None)
    assert (len(data.train), len(data.val)) == (594, 6)
    data = build_datasets(args(dataset=[small], split_dataset_ratio=0.1), qwen, log=lambda m: None)
    assert (len(data.train), len(data.val)) == (90, 10)
    data = build_datasets(args(dataset=[big], val_dataset=[small]), qwen, log=lambda m: None)
    assert (len(data.train), len(data.val)) == (600, 100)
    assert [r.role for r in data.reports] == ["train", "val"]


def test_system_flag_text_and_txt_file(qwen, tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", rows_of(1) + [{"query": "q", "response": "a", "system": "Own."}]))
    txt = tmp_path / "sys.txt"
    txt.write_text("From a file.\n", encoding="utf-8")
    data = build_datasets(args(dataset=[path], system=str(txt)), qwen, log=lambda m: None)
    texts = [qwen.decode(s.input_ids) for s in data.train]
    assert "From a file." in texts[0] and "Own." in texts[1] and "From a file." not in texts[1]
    assert data.system == "From a file." and data.reports[0].rows_with_own_system == 1
    with pytest.raises(UserError, match="does not exist"):
        build_datasets(args(dataset=[path], system=str(tmp_path / "nope.txt")), qwen, log=lambda m: None)


def test_cache_hit_and_invalidation_when_the_file_changes(qwen, tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows_of(5))
    first = build_datasets(args(dataset=[str(path)]), qwen, log=lambda m: None)
    second = build_datasets(args(dataset=[str(path)]), qwen, log=lambda m: None)
    assert not first.reports[0].cache_hit and second.reports[0].cache_hit
    assert second.train == first.train
    write_jsonl(path, rows_of(5, prefix="changed "))
    third = build_datasets(args(dataset=[str(path)]), qwen, log=lambda m: None)
    assert not third.reports[0].cache_hit
    assert "changed 0" in qwen.decode(third.train[0].input_ids)
    # A flag that changes the labels misses too.
    fourth = build_datasets(args(dataset=[str(path)], loss_on_prompt=True), qwen, log=lambda m: None)
    assert not fourth.reports[0].cache_hit and fourth.train[0].labels == fourth.train[0].input_ids


def test_parallel_rendering_matches_serial(qwen, tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", rows_of(2500)))
    serial = build_datasets(args(dataset=[path], data_cache=False), qwen, log=lambda m: None)
    parallel = build_datasets(args(dataset=[path], data_cache=False, dataset_num_proc=2), qwen, log=lambda m: None)
    assert parallel.train == serial.train and len(serial.train) == 2475


def test_prompt_only_rows_load_for_inference(tmp_path):
    path = str(write_jsonl(tmp_path / "q.jsonl", [{"query": "q1"}, {"query": "q2", "response": "a2"}]))
    with pytest.raises(UserError, match="1 malformed row"):
        one([path])
    part = one([path], require_answer=False)
    assert [c.messages[-1]["role"] for c in part.conversations] == ["user", "assistant"]


def test_modelscope_without_the_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_modelscope(name, *a, **kw):
        if name.startswith("modelscope"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_modelscope)
    with pytest.raises(UserError, match="--use_hf false needs the modelscope package: pip install modelscope"):
        one(["AI-ModelScope/alpaca-gpt4-data-zh:default#10"], use_hf=False)


# ---- loss_scale ----

def test_loss_scale_reaches_the_rendered_samples_and_survives_cache_and_truncation(qwen, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = rows_of(3) + [{"query": "long " * 100, "response": "a", "loss_scale": 0.5}]
    rows[1]["loss_scale"] = 2
    write_jsonl(path, rows)
    for hit in (False, True):
        data = build_datasets(args(dataset=[str(path)], max_length=60, truncation_strategy="left"), qwen,
                              log=lambda m: None)
        assert data.reports[0].cache_hit is hit
        assert [s.loss_scale for s in data.train] == [1.0, 2.0, 1.0, 0.5]  # the long row was cut, its scale kept
        assert data.reports[0].loss_scales == {0.5: 1, 2.0: 1} and data.reports[0].truncated == 1
    rows[1]["loss_scale"] = 3  # the cache holds ids and masks; a changed scale is read from the rows
    write_jsonl(path, rows)
    data = build_datasets(args(dataset=[str(path)], max_length=60, truncation_strategy="left"), qwen, log=lambda m: None)
    assert data.reports[0].cache_hit and [s.loss_scale for s in data.train] == [1.0, 3.0, 1.0, 0.5]


def test_a_bad_loss_scale_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(2) + [{"query": "q", "response": "a", "loss_scale": -1}])
    with pytest.raises(UserError) as e:
        load_conversations([str(path)], log=lambda m: None)
    assert f"{path}:3: 'loss_scale' must be a finite number >= 0" in str(e.value)
    csv = tmp_path / "d.csv"
    csv.write_text("query,response,loss_scale\nq,a,2\nq,a,\nq,a,heavy\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{csv}:4: 'loss_scale' must be a finite number >= 0"):
        load_conversations([str(csv)], log=lambda m: None)
    csv.write_text("query,response,loss_scale\nq,a,2\nq,a,\n", encoding="utf-8")
    assert [c.loss_scale for c in one([str(csv)]).conversations] == [2.0, 1.0]  # an empty cell: the default


def test_self_cognition_weight_zh_scales_the_chinese_identity_rows_only():
    names = dict(model_name=["小乐", "Lele"], model_author=["乐团", "LeTeam"])
    plain = one(["self-cognition"], **names)
    weighted = one(["self-cognition"], self_cognition_weight_zh=2.0, **names)
    rows = [json.loads(line) for line in SELF_COGNITION_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert [c.loss_scale for c in plain.conversations] == [1.0] * len(rows)
    assert [c.loss_scale for c in weighted.conversations] == [
        2.0 if (r["lang"], r["kind"]) == ("zh", "identity") else 1.0 for r in rows]
    assert sum(c.loss_scale == 2.0 for c in weighted.conversations) == 88
    assert [c.messages for c in weighted.conversations] == [c.messages for c in plain.conversations]
    with pytest.raises(UserError, match="--self_cognition_weight_zh"):
        DataArgs(self_cognition_weight_zh=-1)
