"""Row shape detection and normalisation to Conversation, including every bad-row error."""

from __future__ import annotations

import pytest

from lorakit.data.formats import Conversation, detect_format, normalise_row
from lorakit.errors import UserError

SRC = "/data/x.jsonl:7"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_alpaca_with_input_system_history():
    row = {"instruction": "Translate", "input": "chat", "output": "猫", "system": "You translate.",
           "history": [["hi", "hello"]]}
    assert detect_format(row) == "alpaca"
    conv = normalise_row(row, SRC)
    assert conv == Conversation(
        msgs(("system", "You translate."), ("user", "hi"), ("assistant", "hello"),
             ("user", "Translate\nchat"), ("assistant", "猫")),
        SRC,
    )


def test_alpaca_empty_input_and_null_optional_keys():
    conv = normalise_row({"instruction": "你是谁？", "input": "", "output": "我是助手。", "system": None,
                          "history": None}, SRC)
    assert conv.messages == msgs(("user", "你是谁？"), ("assistant", "我是助手。"))


def test_sharegpt_roles_and_system_key():
    row = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                             {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}],
           "system": "S"}
    assert detect_format(row) == "sharegpt"
    assert normalise_row(row, SRC).messages == msgs(
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    row = {"conversations": [{"from": "system", "value": "S2"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    assert normalise_row(row, SRC).messages[0] == {"role": "system", "content": "S2"}


def test_openai_messages_keep_system():
    row = {"messages": msgs(("system", "S"), ("user", "q"), ("assistant", "a"))}
    assert detect_format(row) == "messages"
    assert normalise_row(row, SRC).messages == row["messages"]


@pytest.mark.parametrize(
    "row, shape",
    [
        ({"query": "q", "response": "a", "history": [["q0", "a0"]], "system": "S"}, "query-response"),
        ({"prompt": "q", "response": "a", "system": "S"}, "prompt-response"),
        ({"prompt": "q", "completion": "a"}, "prompt-completion"),
        ({"question": "q", "answer": "a"}, "question-answer"),
    ],
)
def test_pair_shapes(row, shape):
    assert detect_format(row) == shape
    messages = normalise_row(row, SRC).messages
    assert messages[-2:] == msgs(("user", "q"), ("assistant", "a"))
    assert (messages[0] == {"role": "system", "content": "S"}) == ("system" in row)
    if "history" in row:
        assert messages[1:3] == msgs(("user", "q0"), ("assistant", "a0"))


def test_unknown_shape_names_source_keys_and_shapes():
    with pytest.raises(UserError) as e:
        normalise_row({"text": "hello", "label": 1}, SRC)
    message = str(e.value)
    assert SRC in message and "keys found: label, text" in message
    assert "instruction/input/output" in message and "conversations" in message


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": "q", "output": 3}, "'output' must be a string, got int"),
        ({"instruction": ["q"], "output": "a"}, "'instruction' must be a string, got list"),
        ({"instruction": "q", "output": "   "}, "'output' is empty"),
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
         "messages[0].content must be a string"),
        ({"messages": msgs(("user", "q"), ("assistant", ""))}, "turn 2 (assistant) has empty content"),
        ({"messages": msgs(("user", "q"))}, "no assistant turn"),
        ({"messages": msgs(("system", "S"), ("user", "q"))}, "no assistant turn"),
        ({"messages": msgs(("user", "q"), ("assistant", "a"), ("user", "q2"))}, "last turn is a user turn"),
        ({"messages": msgs(("user", "q"), ("user", "q2"), ("assistant", "a"))}, "two user turns in a row"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "from='robot'"),
        ({"query": "q", "response": "a", "history": [["only one"]]}, "history[0] must be a [query, response] pair"),
        ({"messages": []}, "no user or assistant turns"),
    ],
)
def test_bad_rows_name_the_problem_and_source(row, expected):
    with pytest.raises(UserError) as e:
        normalise_row(row, SRC)
    assert str(e.value).startswith(SRC + ":")
    assert expected in str(e.value)


def test_non_object_row():
    with pytest.raises(UserError, match="expected a JSON object per row, got list"):
        normalise_row(["q", "a"], SRC)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"query": "q"}, [("user", "q")]),
        ({"instruction": "i", "input": "x"}, [("user", "i\nx")]),
        ({"prompt": "q", "system": "S"}, [("system", "S"), ("user", "q")]),
        ({"messages": [{"role": "user", "content": "q"}]}, [("user", "q")]),
        ({"query": "q", "response": "a"}, [("user", "q"), ("assistant", "a")]),
    ],
)
def test_prompt_only_rows_for_inference(row, expected):
    assert normalise_row(row, SRC, require_answer=False).messages == msgs(*expected)
    if expected[-1][0] != "assistant":  # training still refuses a row with nothing to learn
        with pytest.raises(UserError):
            normalise_row(row, SRC)


def test_prompt_only_still_rejects_empty_and_wrong_types():
    with pytest.raises(UserError, match="'query' is empty"):
        normalise_row({"query": " "}, SRC, require_answer=False)
    with pytest.raises(UserError, match="'response' must be a string"):
        normalise_row({"query": "q", "response": 1}, SRC, require_answer=False)


@pytest.mark.parametrize("value, expected", [(None, 1.0), (2, 2.0), (0.5, 0.5), (0, 0.0), ("1.5", 1.5)])
def test_loss_scale_of_a_row(value, expected):
    row = {"query": "q", "response": "a"} | ({} if value is None else {"loss_scale": value})  # "1.5": a CSV cell
    assert normalise_row(row, SRC) == Conversation(msgs(("user", "q"), ("assistant", "a")), SRC, loss_scale=expected)
    messages = {"messages": msgs(("user", "q"), ("assistant", "a"))} | ({} if value is None else {"loss_scale": value})
    assert normalise_row(messages, SRC).loss_scale == expected


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), "heavy", "nan", True, [2], {"x": 1}])
def test_bad_loss_scale_names_the_row(value):
    with pytest.raises(UserError) as e:
        normalise_row({"query": "q", "response": "a", "loss_scale": value}, SRC)
    assert str(e.value).startswith(SRC + ": 'loss_scale' must be a finite number >= 0")
