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
    assert retention_correct("法国的首都是巴黎。", ["巴黎", "Paris"])
    assert not retention_correct("法国的首都是伦敦。", ["巴黎", "Paris"])
    assert retention_correct("Water is H2O.", ["H2O"])
