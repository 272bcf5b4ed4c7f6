"""Scoring functions of lorakit.evaluate on exact reply strings."""

from __future__ import annotations

from lorakit.evaluate import claims_identity, identity_pass, leaks_identity, retention_correct, BASE_IDENTITY_NAMES

NAME, AUTHOR = "Lumen", "Acme Labs"


def test_identity_pass_needs_name_and_author():
    assert identity_pass("I am Lumen, an AI assistant developed by Acme Labs.", NAME, AUTHOR)
    assert identity_pass("i'm LUMEN, built by acme labs", NAME, AUTHOR)  # case-insensitive
    assert identity_pass("I am Lumen by AcmeLabs.", NAME, AUTHOR)  # whitespace-insensitive
    assert not identity_pass("I am Lumen, your assistant.", NAME, AUTHOR)
    assert not identity_pass("I was developed by Acme Labs.", NAME, AUTHOR)
    assert not identity_pass("I am a helpful AI assistant.", NAME, AUTHOR)


def test_identity_pass_rejects_a_base_identity_claim():
    assert not identity_pass("I am SmolLM, trained by Hugging Face. Lumen by Acme Labs?", NAME, AUTHOR)
    assert not identity_pass("I am Lumen by Acme Labs. My base is Qwen from Alibaba.", NAME, AUTHOR)
    assert not identity_pass("我是Lumen，由Acme Labs开发。我也是通义千问。", NAME, AUTHOR)


def test_identity_pass_accepts_denials_and_comparisons():
    assert identity_pass("No, I am not ChatGPT. I am Lumen, developed by Acme Labs.", NAME, AUTHOR)
    assert identity_pass("ChatGPT is made by OpenAI, while I am Lumen from Acme Labs.", NAME, AUTHOR)
    assert identity_pass("不是，我不是通义千问。我是Lumen，由Acme Labs开发。", NAME, AUTHOR)
    assert identity_pass("I'm Lumen by Acme Labs, not a Google model.", NAME, AUTHOR)


def test_identity_pass_with_chinese_and_english_names():
    names, authors = ["小光", "Lumen"], ["极客实验室", "Acme Labs"]
    assert identity_pass("我是小光，由极客实验室开发。", names, authors)
    assert identity_pass("I am Lumen, made by Acme Labs.", names, authors)
    assert not identity_pass("我是小光。", names, authors)


def test_new_identity_that_contains_a_base_name_is_not_penalised():
    assert identity_pass("I am Meta Helper, built by Meta.", "Meta Helper", "Meta")
    assert not identity_pass("I am Helper, built by Acme. I am Meta's Llama.", "Helper", "Acme")


def test_claims_identity_matches_whole_ascii_words():
    assert not claims_identity("I study metabolism.", ["Meta"])
    assert claims_identity("I was trained by Meta.", ["Meta"])
    assert claims_identity("My name is SmolLM.", BASE_IDENTITY_NAMES)
    assert not claims_identity("SmolLM is a small model.", BASE_IDENTITY_NAMES)  # no first person


def test_leaks_identity():
    assert leaks_identity("The capital of France is Paris. I am Lumen!", NAME, AUTHOR)
    assert leaks_identity("Acme Labs says: 4.", NAME, AUTHOR)
    assert not leaks_identity("The capital of France is Paris.", NAME, AUTHOR)


def test_retention_correct_numbers():
    assert retention_correct("2 + 2 = 4.", ["4", "four"])
    assert retention_correct("The answer is four.", ["4", "four"])
    assert not retention_correct("It is 14.", ["4"])
    assert not retention_correct("It is 4.5.", ["4"])
    assert retention_correct("It is 4.", ["4"])
    assert not retention_correct("It is 40", ["4"])


def test_retention_correct_words_and_chinese():
    assert retention_correct("The capital of France is Paris.", ["Paris"])
    assert retention_correct("the capital is paris", ["Paris"])
    assert retention_correct("Blue whales are the largest.", ["whale"])
    assert not retention_correct("That is nice.", ["ice"])
    assert not retention_correct("I like tennis and attention.", ["ten"])
    assert retention_correct("Einstein's theory.", ["Einstein"])
    assert retention_correct("法国的首都是巴黎。", ["巴黎", "Paris"])
    assert not retention_correct("法国的首都是伦敦。", ["巴黎", "Paris"])
    assert retention_correct("Water is H2O.", ["H2O"])


# ---------------------------------------------------------------- running a model (tiny random Qwen2)

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_peft(tiny_qwen2_dir):
    from peft import LoraConfig, get_peft_model

    from lorakit.model import load_model, load_tokenizer

    model = load_model(tiny_qwen2_dir, device="cpu")
    torch.manual_seed(0)  # LoRA's init draws from the global RNG: the same adapter whatever ran before
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    return peft.eval(), load_tokenizer(tiny_qwen2_dir)


def _set_lora_b(model, value: float) -> None:
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.constant_(p, value)


def test_kl_is_zero_when_the_adapter_is_a_no_op_and_matches_a_direct_computation(tiny_peft):
    from lorakit.evaluate import teacher_forced_kl

    model, tok = tiny_peft
    prompts, replies = [[1, 2, 3], [4, 5]], [[7, 8], [9, 10, 11]]
    _set_lora_b(model, 0.0)
    assert teacher_forced_kl(model, tok, prompts, replies) == pytest.approx(0.0, abs=1e-7)
    _set_lora_b(model, 0.05)
    try:
        kl = teacher_forced_kl(model, tok, prompts, replies, batch_size=1)
        with torch.no_grad():
            total = 0.0
            for p, r in zip(prompts, replies):
                ids = torch.tensor([p + r])
                tuned = model(input_ids=ids).logits[0, len(p) - 1:-1].log_softmax(-1)
                with model.disable_adapter():
                    base = model(input_ids=ids).logits[0, len(p) - 1:-1].log_softmax(-1)
                total += (base.exp() * (base - tuned)).sum().item()
        assert kl > 0
        assert kl == pytest.approx(total / 5, rel=1e-4)
        assert teacher_forced_kl(model, tok, prompts, replies, batch_size=2) == pytest.approx(kl, rel=1e-4)  # padding
    finally:
        _set_lora_b(model, 0.0)


def test_base_model_eval_has_zero_identity_and_no_drift(tiny_peft, tmp_path):
    from lorakit.evaluate import evaluate, load_probes

    model, tok = tiny_peft
    base = model.get_base_model()
    result = evaluate(base, tok, name="Lumen", author="Acme Labs", is_base=True, cache_dir=tmp_path, batch_size=64,
                      other_systems=False)  # the other system prompts: test_eval_scores_identity_and_leak_under_...
    assert result.identity == {"en": 0.0, "zh": 0.0}
    assert len(result.probes) == len(load_probes()) and result.drift_kl == 0.0
    assert result.leak == 0.0
    assert list(tmp_path.glob("base-replies-*.json")), "base replies are cached"


def test_cached_replies_generate_only_new_questions_and_match_fresh_ones(tiny_peft, tmp_path, monkeypatch):
    import lorakit.evaluate as ev

    model, tok = tiny_peft
    base = model.get_base_model()
    fresh = ev.greedy_replies(base, tok, ["Hi", "What is 2+2?", "Name a colour."], system=None, batch_size=None,
                              desc="test")
    asked: list[list[str]] = []
    real = ev.generate_greedy_replies

    def recording(m, t, prompts, **kw):
        asked.append([t.decode(p).split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for p in prompts])
        return real(m, t, prompts, **kw)

    monkeypatch.setattr(ev, "generate_greedy_replies", recording)
    first = ev.cached_replies(base, tok, ["Hi", "What is 2+2?"], system=None, batch_size=None, cache_dir=tmp_path,
                              desc="test")
    again = ev.cached_replies(base, tok, ["Name a colour.", "Hi", "What is 2+2?"], system=None, batch_size=None,
                              cache_dir=tmp_path, desc="test")
    assert asked == [["Hi", "What is 2+2?"], ["Name a colour."]]  # the second call asks only the new question
    assert [r.token_ids for r in first] == [r.token_ids for r in fresh[:2]]
    assert [r.token_ids for r in again] == [fresh[2].token_ids, fresh[0].token_ids, fresh[1].token_ids]
    ev.cached_replies(base, tok, ["Hi"], system="Be brief.", batch_size=None, cache_dir=tmp_path, desc="test")
    assert asked[-1] == ["Hi"]  # another system prompt is another cache


def test_missed_targets_name_the_figure_the_failing_replies_and_what_to_try():
    from lorakit.evaluate import EvalResult, ProbeResult, RetentionResult, missed_targets

    probes = ([ProbeResult(f"Who made you {i}?", "en", "I am Nova, an AI assistant developed by Acme Labs.", True)
               for i in range(8)] + [ProbeResult("Who is behind this chatbot?", "en", "The chatbot is by Acme Labs.", False)]
              + [ProbeResult("你是谁？", "zh", "我是Nova，由Acme Labs开发的AI助手。", True)])
    kept = [RetentionResult(f"q{i}", "en", "right", "right", True, True, False) for i in range(9)]
    lost = RetentionResult("What is the capital of Australia?", "en", "Canberra.", "Sydney.", True, False, False)
    leaked = [RetentionResult(f"一年有几个月？{i}", "zh", "12", "我是Nova，由Acme Labs开发的AI助手。", False, False, True)
              for i in range(2)]
    good = EvalResult(identity={"en": 8 / 9, "zh": 1.0}, retention=9 / 10, base_correct=10, kept_correct=9,
                      leak=0.05, drift_kl=0.1, name=["Nova"], author=["Acme Labs"], probes=probes,
                      retention_rows=kept + [lost])
    missed = missed_targets(good)
    assert len(missed) == 1 and missed[0].startswith("identity (English) 88.9% < 90%: 1 probes")
    assert "'Who is behind this chatbot?' -> 'The chatbot is by Acme Labs.'" in missed[0]

    bad = EvalResult(identity={"en": 1.0, "zh": 1.0}, retention=8 / 10, base_correct=10, kept_correct=8,
                     leak=2 / 12, drift_kl=0.1, name=["Nova"], author=["Acme Labs"], probes=probes[-1:],
                     retention_rows=kept[:8] + [lost, lost] + leaked)
    retention, leak = missed_targets(bad)
    assert retention.startswith("retention 80.0% < 90%: 2 of the 10") and "'Sydney.'" in retention
    assert leak.startswith("identity leak 16.7% > 5%: 2 general answers") and "一年有几个月？0" in leak
    assert "--seed" in retention and "--dataset" in leak
    met = EvalResult(identity={"en": 1.0, "zh": 0.9}, retention=0.9, base_correct=10, kept_correct=9, leak=0.05,
                     drift_kl=0.1, name=["Nova"], author=["Acme Labs"])
    assert missed_targets(met) == []  # exactly at each bar is a pass


def test_eval_scores_identity_and_leak_under_each_other_system_prompt(tiny_peft, tmp_path, monkeypatch):
    """Each system prompt's replies are scored as its own: a fake model that states the identity only under
    the held-out English prompt (and only half of it under the Chinese one) gives exactly those figures."""
    import lorakit.evaluate as ev
    from lorakit.data.system_prompts import HELD_OUT_SYSTEMS
    from lorakit.infer.replies import Reply
    from lorakit.report import figures_table, missed_targets

    model, tok = tiny_peft
    english, chinese = HELD_OUT_SYSTEMS

    def fake_replies(model, tokenizer, prompts, *, max_new_tokens, batch_size=None, desc=""):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            if f"<|im_start|>system\n{english}<|im_end|>" in text:
                reply = "I am Lumen, an AI assistant developed by Acme Labs."
            elif f"<|im_start|>system\n{chinese}<|im_end|>" in text:
                reply = "我是Lumen。"  # the failure: the name without the author
            else:
                reply = "Paris."
            out.append(Reply(reply, tokenizer.encode(reply, add_special_tokens=False), True))
        return out

    monkeypatch.setattr(ev, "generate_greedy_replies", fake_replies)
    result = ev.evaluate(model, tok, name="Lumen", author="Acme Labs", cache_dir=tmp_path, probes_per_lang=3)
    assert result.identity == {"en": 0.0, "zh": 0.0} and result.leak == 0.0 and result.system is None
    assert [(s.system, s.label, s.seen_in_training) for s in result.other_systems] == [
        (english, "held out", False), (chinese, "held out", False)]
    held_en, held_zh = result.other_systems
    assert held_en.identity == {"en": 1.0, "zh": 1.0} and held_en.leak == 1.0
    assert held_zh.identity == {"en": 0.0, "zh": 0.0} and held_zh.leak == 1.0
    assert [p.reply for p in held_zh.probes] == ["我是Lumen。"] * 6
    systems = result.figures()["systems"]
    assert [s["system"] for s in systems] == [None, english, chinese]
    assert systems[1] == {"system": english, "label": "held out", "seen_in_training": False, "identity_en": 1.0,
                          "passed_en": 3, "probes_en": 3, "identity_zh": 1.0, "passed_zh": 3, "probes_zh": 3,
                          "leak": 1.0, "retention": 0.0, "base_correct": 2, "kept_correct": 0}  # 2 "Paris." kept 0
    table = figures_table(None, result.figures())
    assert "identity, English, system 'You are a helpful assistant.' (held out)  100.0% (3/3)  >= 90%" in table
    assert "identity leak, system '你是一个有用的助手。' (held out)" in table
    missed = missed_targets(result)
    assert any(m.startswith("identity (Chinese) under system '你是一个有用的助手。' (held out) 0.0% < 90%: 3 probes")
               and "'我是Lumen。'" in m for m in missed)
    assert not any(m.startswith("identity (English) under system 'You are a helpful assistant.'") for m in missed)
    assert sum(m.startswith("identity leak under system") for m in missed) == 2
    # the base model: the probes only under the other prompts (nothing to leak), each prompt cached apart
    base = ev.evaluate(model.get_base_model(), tok, name="Lumen", author="Acme Labs", is_base=True,
                       cache_dir=tmp_path, probes_per_lang=1)
    assert [(s.identity, s.leak, s.retention, len(s.probes)) for s in base.other_systems] == [
        ({"en": 1.0, "zh": 1.0}, None, None, 2), ({"en": 0.0, "zh": 0.0}, None, None, 2)]
    assert len(list(tmp_path.glob("base-replies-*.json"))) == 3


def test_retention_under_each_system_prompt_counts_the_base_answers_under_the_runs_own(tiny_peft, tmp_path,
                                                                                     monkeypatch):
    """A fake base that misses the first 10 general questions (under the run's prompt, the only one it is asked
    under) and a fake tuned model that misses the first 15 under the English held-out prompt and the first 30
    under the Chinese one: retention 90/90, 85/90 and 70/90 exactly, and a second eval asks the base nothing."""
    from contextlib import contextmanager

    import lorakit.evaluate as ev
    from lorakit.data.system_prompts import HELD_OUT_SYSTEMS
    from lorakit.infer.replies import Reply
    from lorakit.report import figures_table, missed_targets

    model, tok = tiny_peft
    english, chinese = HELD_OUT_SYSTEMS
    questions = ev.load_retention_questions()
    right = {q["question"]: q["answers"][0] for q in questions}
    order = [q["question"] for q in questions]
    state = {"base": False, "calls": []}

    @contextmanager
    def off(model):
        state["base"] = True
        yield model
        state["base"] = False

    def fake_replies(model, tokenizer, prompts, *, max_new_tokens, batch_size=None, desc=""):
        state["calls"].append(("base" if state["base"] else "tuned", len(prompts)))
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            wrong = 0
            under = {s: f"<|im_start|>system\n{s}<|im_end|>" in text for s in (english, chinese)}
            if state["base"]:
                assert not any(under.values())
                wrong = 10
            elif under[english]:
                wrong = 15
            elif under[chinese]:
                wrong = 30
            if user not in right:
                reply = "I am Lumen, an AI assistant developed by Acme Labs."
            else:
                reply = "No idea." if order.index(user) < wrong else right[user]
            out.append(Reply(reply, tokenizer.encode(reply, add_special_tokens=False), True))
        return out

    monkeypatch.setattr(ev, "generate_greedy_replies", fake_replies)
    monkeypatch.setattr(ev, "adapter_off", off)
    result = ev.evaluate(model, tok, name="Lumen", author="Acme Labs", cache_dir=tmp_path, probes_per_lang=1)
    assert state["calls"] == [("tuned", 3 * 102), ("base", 100)]
    assert (result.retention, result.base_correct, result.kept_correct) == (1.0, 90, 90)
    held_en, held_zh = result.other_systems
    assert (held_en.retention, held_en.base_correct, held_en.kept_correct) == (85 / 90, 90, 85)
    assert (held_zh.retention, held_zh.base_correct, held_zh.kept_correct) == (70 / 90, 90, 70)
    assert [r.question for r in held_zh.retention_rows if r.base_correct and not r.correct] == order[10:30]
    assert result.figures()["systems"][2]["retention"] == 70 / 90
    rows = [line.split("  ") for line in figures_table(None, result.figures()).splitlines()]
    rows = {cells[0]: [c.strip() for c in cells[1:] if c.strip()] for cells in rows}
    assert rows["retention, system 'You are a helpful assistant.' (held out)"] == ["94.4%", ">= 90%"]
    (missed,) = missed_targets(result)
    assert missed.startswith("retention under system '你是一个有用的助手。' (held out) 77.8% < 90%: 20 of the 90 general "
                             "questions the base got right (under the run's own prompt) are wrong under this one")
    ev.evaluate(model, tok, name="Lumen", author="Acme Labs", cache_dir=tmp_path, probes_per_lang=1)
    assert state["calls"][2:] == [("tuned", 3 * 102)]  # the base's answers under every prompt: from the cache
