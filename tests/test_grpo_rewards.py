"""Built-in rewards (ms-swift's definitions), plugin loading, and the errors of a failing reward function."""

from __future__ import annotations

import math
import textwrap

import pytest

from lorakit.errors import UserError
from lorakit.rlhf import rewards as R


def inputs(completions, *, ids=None, **columns):
    n = len(completions)
    return R.RewardInputs(completions=completions, completion_ids=ids or [[1] * 3] * n,
                          prompts=[[{"role": "user", "content": "q"}]] * n, columns=columns,
                          sources=[f"data.jsonl:{i + 1}" for i in range(n)])


def test_final_answer_forms():
    assert R.final_answer(r"so \boxed{\frac{1}{2}} and \boxed{x^{2}+1}") == "x^{2}+1"
    assert R.final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert R.final_answer("<think>3+4</think><answer>It is 7</answer>") == "7"
    assert R.final_answer("I think 12, no wait, 1,250 apples.") == "1,250"
    assert R.final_answer("no number here") is None


@pytest.mark.parametrize("pred, ref, same", [
    ("1,250", "1250", True), ("0.5", r"\frac{1}{2}", True), (r"\dfrac{3}{4}", "0.75", True),
    ("$18$", "18", True), (r"\text{(B)}", "(B)", True), ("17", "18", False), ("x+1", "x + 1", True),
])
def test_answers_match(pred, ref, same):
    assert R.answers_match(pred, ref) is same


def test_accuracy_numina_and_gsm8k_rows():
    numina = r"The sum is $2+3=5$, so the answer is $\boxed{5}$."
    got = R.accuracy([r"...so \boxed{5}", "the answer is 5", "it is 6", "x"], solution=[numina, numina, numina, None])
    assert got == [1.0, 1.0, 0.0, None]
    assert R.accuracy(["She has 72 clips."], answer=["48/2 = 24\n#### 72"]) == [1.0]
    with pytest.raises(UserError, match="no 'solution' or 'answer' column"):
        R.accuracy(["5"], question=["q"])


def test_format_reward_is_ms_swift_pattern():
    got = R.format_reward(["<think>a\nb</think>\n<answer>5</answer>", "<think>a</think><answer>5</answer> extra",
                           "<answer>5</answer>", " <think>a</think><answer>5</answer>"])
    assert got == [1.0, 0.0, 0.0, 0.0]


def test_repetition_soft_overlong_cosine():
    rep = R.Repetition(n_grams=3, max_penalty=-1.0)
    # "a b c a b c": 4 trigrams, 3 distinct -> -(1 - 3/4)
    assert rep(["a b c a b c", "one two", ""]) == [-0.25, 0.0, 0.0]
    soft = R.SoftOverlong(soft_max_length=10, soft_cache_length=4)
    assert soft(["", "", ""], completion_ids=[[0] * 5, [0] * 8, [0] * 10]) == [0.0, -0.5, -1.0]
    cos = R.Cosine(max_len=10)
    got = cos(["5", "5", "6", "6"], completion_ids=[[0] * 0, [0] * 10, [0] * 0, [0] * 10], answer=["5"] * 4)
    assert got == pytest.approx([1.0, 0.5, -0.5, 0.0])
    mid = cos(["5"], completion_ids=[[0] * 5], answer=["5"])[0]
    assert mid == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_soft_overlong_needs_cache_length():
    with pytest.raises(UserError, match="--soft_cache_length"):
        R.builtin("soft_overlong", R.RewardSettings())


def test_plugin_function_and_class_with_dataset_columns(tmp_path):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(textwrap.dedent("""
        def short(completions, **kwargs):
            return [1.0 if len(c) < kwargs["limit"][i] else 0.0 for i, c in enumerate(completions)]

        class MentionsCity:
            def __call__(self, completions, city, **kwargs):
                return [float(t in c) for c, t in zip(completions, city)]

        def not_applicable(completions, **kwargs):
            return [None] * len(completions)
    """))
    funcs = R.resolve_reward_funcs(["short", "MentionsCity", "not_applicable", "format"], [str(plugin)],
                                   R.RewardSettings())
    assert [f.origin for f in funcs] == [str(plugin)] * 3 + ["built-in"]
    got = R.compute_rewards(funcs, inputs(["Paris!", "I like London a lot"], limit=[10, 10], city=["Paris", "Rome"]))
    assert got[:, :2].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert got[:, 2].isnan().all() and got[:, 3].tolist() == [0.0, 0.0]


def test_unknown_reward_name_lists_what_exists(tmp_path):
    plugin = tmp_path / "r.py"
    plugin.write_text("def mine(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(UserError, match=r"--reward_funcs mien: unknown.*accuracy, format.*mine"):
        R.resolve_reward_funcs(["mien"], [str(plugin)], R.RewardSettings())
    with pytest.raises(UserError, match="no such file"):
        R.resolve_reward_funcs(["x"], [str(tmp_path / "missing.py")], R.RewardSettings())


def test_raising_reward_names_function_and_sample(tmp_path):
    plugin = tmp_path / "bad.py"
    plugin.write_text(textwrap.dedent("""
        def picky(completions, **kwargs):
            return [float(int(c)) for c in completions]
    """))
    funcs = R.resolve_reward_funcs(["picky"], [str(plugin)], R.RewardSettings())
    with pytest.raises(UserError) as err:
        R.compute_rewards(funcs, inputs(["1", "2", "two", "4"]))
    message = str(err.value)
    assert "reward function picky" in message and "ValueError" in message
    assert "data.jsonl:3" in message and "'two'" in message and "--resume_from_checkpoint" in message


def test_wrong_return_shape_is_an_error(tmp_path):
    plugin = tmp_path / "short.py"
    plugin.write_text("def one(completions, **kw):\n    return [1.0]\n\ndef text(completions, **kw):\n"
                      "    return ['high'] * len(completions)\n")
    funcs = R.resolve_reward_funcs(["one", "text"], [str(plugin)], R.RewardSettings())
    with pytest.raises(UserError, match=r"reward function one .* one float \(or None\) per completion \(2\)"):
        R.compute_rewards(funcs[:1], inputs(["a", "b"]))
    with pytest.raises(UserError, match=r"returned 'high' for completion 0 \(data.jsonl:1\)"):
        R.compute_rewards(funcs[1:], inputs(["a", "b"]))


def test_the_readme_reward_loads_as_a_plugin_and_scores_as_it_says(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**GRPO with your own reward**", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(code)
    [fn] = R.resolve_reward_funcs(["concise_answer"], [str(plugin)], R.RewardSettings())
    assert fn.origin == str(plugin)
    assert fn.fn(["Paris.", "The capital is Paris", "Lyon"], answer=["Paris", "Paris", "Paris"]) == [1.0, 0.25, 0.0]
