"""quickstart: the recipe it picks, the report it writes, and the whole flow on the real SmolLM2."""

from __future__ import annotations

import json
import re

import pytest

from lorakit.args import QuickstartArgs, RecipeArgs
from lorakit.errors import UserError
from lorakit.quickstart import (ATTENTION, MAX_EPOCHS, MIN_STEPS, choose_recipe, default_target_modules,
                                 self_cognition_rows, sft_args_for)
from lorakit.replay import load_general_prompts
from lorakit.report import Report, figures_table, system_title, write_report


def _steps(recipe, n_rows):
    return recipe.num_train_epochs * -(-n_rows // recipe.per_device_train_batch_size)


def test_recipe_reaches_enough_steps():
    for n_rows in (128, 165, 300):
        for device in ("cpu", "cuda"):
            assert _steps(choose_recipe(n_rows, 135_000_000, device), n_rows) >= MIN_STEPS
    mix = self_cognition_rows() + len(load_general_prompts())  # quickstart's default: every replay prompt
    assert choose_recipe(mix, 135_000_000, "cpu").per_device_train_batch_size == 12
    assert choose_recipe(mix, 7_600_000_000, "cuda").per_device_train_batch_size == 8
    alone = self_cognition_rows()  # --replay 0: narrower, more steps
    assert choose_recipe(alone, 135_000_000, "cpu").per_device_train_batch_size == alone // MIN_STEPS < 12
    big = choose_recipe(10_000, 135_000_000, "cuda")
    assert big.num_train_epochs == 1  # plenty of steps already


def test_lora_goes_on_a_small_models_attention_and_on_every_linear_layer_of_a_large_one():
    llama = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert default_target_modules(135_000_000, llama) == ATTENTION
    assert default_target_modules(7_600_000_000, llama) == ["all-linear"]
    assert default_target_modules(124_000_000, {"c_attn", "c_proj", "c_fc"}) == ["all-linear"]  # GPT-2 names
    assert choose_recipe(500, 135_000_000, "cpu", target_modules=ATTENTION).target_modules == ATTENTION
    assert choose_recipe(500, 135_000_000, "cpu").target_modules == ["all-linear"]


def test_recipe_on_the_tutorials_16_rows_is_capped_but_never_a_handful_of_steps():
    recipe = choose_recipe(16, 135_000_000, "cpu")
    assert recipe.per_device_train_batch_size == 1 and _steps(recipe, 16) >= MIN_STEPS
    assert choose_recipe(4, 135_000_000, "cpu").num_train_epochs == MAX_EPOCHS  # capped: 24 steps, not 36


def test_recipe_learning_rate_follows_model_size_and_flags_win():
    assert choose_recipe(200, 135_000_000, "cpu").learning_rate > choose_recipe(200, 7_600_000_000, "cuda").learning_rate
    assert 1e-4 <= choose_recipe(200, 7_600_000_000, "cuda").learning_rate <= 2e-4
    chosen = choose_recipe(200, 135_000_000, "cpu", epochs=1.5, learning_rate=3e-4)
    assert (chosen.num_train_epochs, chosen.learning_rate) == (1.5, 3e-4)


def test_recipe_weighs_the_chinese_identity_rows_twice_and_hands_it_to_sft():
    assert choose_recipe(200, 135_000_000, "cpu").self_cognition_weight_zh == 2.0
    recipe = choose_recipe(200, 135_000_000, "cpu", self_cognition_weight_zh=1.0)  # --self_cognition_weight_zh 1
    assert recipe.self_cognition_weight_zh == 1.0
    args = QuickstartArgs()
    assert sft_args_for(args, choose_recipe(200, 135_000_000, "cpu"), ["self-cognition"]).data.self_cognition_weight_zh == 2.0
    assert sft_args_for(args, recipe, ["self-cognition"]).data.self_cognition_weight_zh == 1.0
    with pytest.raises(UserError, match="--self_cognition_weight_zh must be positive"):
        RecipeArgs(self_cognition_weight_zh=-1)


def _report(tmp_path):
    before = {"identity_en": 0.0, "identity_zh": 0.0, "retention": 1.0, "leak": 0.0, "drift_kl": 0.0}
    after = {"identity_en": 0.9375, "identity_zh": 0.96875, "retention": 0.95, "leak": 0.01, "drift_kl": 0.0421}
    return Report(model="m", name=["Lumen"], author=["Acme Labs"], checkpoint=str(tmp_path / "checkpoint-9"),
                  infer_command=f"lorakit infer --adapters {tmp_path / 'checkpoint-9'}", before=before, after=after,
                  recipe={"learning_rate": 1e-3}, timings={"training": 12.5},
                  log_history=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])


def test_table_shows_before_after_and_targets(tmp_path):
    table = figures_table(_report(tmp_path).before, _report(tmp_path).after)
    assert "93.8%" in table and "96.9%" in table and "95.0%" in table and "0.0421" in table
    assert ">= 90%" in table and "<= 5%" in table


def test_report_files_hold_the_numbers(tmp_path):
    report = _report(tmp_path)
    paths = write_report(report, tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.md", "report.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["after"]["identity_zh"] == 0.96875 and data["infer_command"] == report.infer_command
    md = (tmp_path / "report.md").read_text()
    assert "| identity, English (held-out probes) | 0.0% | 93.8% | >= 90% |" in md
    assert report.infer_command in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Missed targets" not in md
    report.missed = ["retention 86.4% < 90%: 6 of the 44 general questions the base got right are now wrong"]
    write_report(report, tmp_path)
    assert f"## Missed targets\n\n- {report.missed[0]}\n" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["missed"] == report.missed


@pytest.mark.slow
def test_quickstart_end_to_end_on_smollm2(cli, smollm2_dir, tmp_path):
    """The README's first command, as a user runs it (shortened for CI: a small replay set and one epoch;
    the acceptance figures of the full default run are measured separately, see the README)."""
    proc = cli("quickstart", "--model_name", "Lumen", "--model_author", "Acme Labs", "--output_dir", str(tmp_path),
               "--replay", "16", "--num_train_epochs", "1", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(tmp_path.glob("v*-*"))
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("report.md", "report.png", "eval.json"):
        assert (run_dir / name).is_file()
    # the printed table holds the numbers in report.json
    printed = re.search(r"identity, English \(held-out probes\)\s+(\S+) \((\d+)/(\d+)\)\s+(\S+) \((\d+)/(\d+)\)",
                        proc.stdout)
    after = report["after"]
    assert printed.group(4) == f"{100 * after['identity_en']:.1f}%"
    assert (int(printed.group(5)), int(printed.group(6))) == (after["passed_en"], after["probes_en"]) == (
        round(after["identity_en"] * 32), 32)
    assert (int(printed.group(2)), int(printed.group(3))) == (0, report["before"]["probes_en"])
    assert report["before"]["identity_en"] == 0.0 and report["before"]["identity_zh"] == 0.0
    assert f"lorakit infer --adapters {report['checkpoint']}" in proc.stdout
    # a missed target is printed with its explanation, the same lines as in report.json
    missed = [line.removeprefix("missed: ") for line in proc.stdout.splitlines() if line.startswith("missed: ")]
    assert missed == report["missed"]
    # the run's own prompt's lines ("retention 86.4% ..."; the other prompts': "retention under system ...")
    assert any(re.match(r"identity \(English\) \d", m) for m in missed) == (after["identity_en"] < 0.9)
    assert any(re.match(r"retention \d", m) for m in missed) == (after["retention"] < 0.9)
    for entry in report["after"]["systems"][1:]:
        assert any(m.startswith(f"retention under {system_title(entry)} ") for m in missed) == (
            entry["retention"] < 0.9)
    # even this short run learns the identity (the base scores 0 on the same held-out probes)
    assert report["after"]["identity_en"] >= 0.25 and report["after"]["identity_zh"] >= 0.25
    # ... and under system prompts no training row uses ("You are a helpful assistant." is the case)
    systems = {s["system"]: s for s in report["after"]["systems"]}
    held_out = systems["You are a helpful assistant."]
    assert held_out["label"] == "held out" and not held_out["seen_in_training"] and held_out["probes_zh"] == 32
    assert held_out["identity_en"] >= 0.25 and held_out["identity_zh"] >= 0.25
    assert [s["label"] for s in report["after"]["systems"]] == ["training", "held out", "held out"]
    for entry in report["after"]["systems"]:  # retention under each prompt, against the base under the run's own
        assert 0 < entry["kept_correct"] <= entry["base_correct"] and entry["retention"] == pytest.approx(
            entry["kept_correct"] / entry["base_correct"])
    shown = re.search(r"identity, Chinese, system 'You are a helpful assistant.' \(held out\)\s+\S+ \(0/\d+\)\s+"
                      r"(\S+) \((\d+)/32\)", proc.stdout)
    assert (shown.group(1), int(shown.group(2))) == (f"{100 * held_out['identity_zh']:.1f}%", held_out["passed_zh"])
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert [s["system"] for s in evaluated["other_systems"]] == ["You are a helpful assistant.", "你是一个有用的助手。"]


@pytest.mark.slow
def test_eval_of_the_base_model_gives_identity_zero(cli, smollm2_dir, tmp_path):
    out = tmp_path / "eval.json"
    proc = cli("eval", "--model", str(smollm2_dir), "--model_name", "Lumen", "--model_author", "Acme Labs",
               "--eval_output", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert figures["identity_en"] == 0.0 and figures["identity_zh"] == 0.0
    assert figures["retention"] == 1.0 and figures["drift_kl"] == 0.0


def test_lora_targets_are_checked_against_the_model_before_any_work(tiny_qwen2_dir):
    from lorakit.args import DataArgs, QuickstartArgs
    from lorakit.errors import UserError
    from lorakit.model import load_model
    from lorakit.quickstart import lora_targets

    model = load_model(tiny_qwen2_dir, device="cpu")
    args = QuickstartArgs(data=DataArgs(model_name=["Lumen"], model_author=["Acme Labs"]))
    assert lora_targets(args, model, 1_000_000) == ATTENTION
    args.recipe.target_modules = ["q_proj", "c_attn"]
    with pytest.raises(UserError, match="c_attn: no such module"):
        lora_targets(args, model, 1_000_000)
    args.recipe.target_modules = ["all-linear"]
    assert lora_targets(args, model, 1_000_000) == ["all-linear"]


def test_report_md_says_how_each_column_was_scored_and_lists_lost_answers(tmp_path):
    from lorakit.report import smoothed

    report = _report(tmp_path)
    report.before |= {"probes_en": 4, "probes_zh": 4, "passed_en": 0, "passed_zh": 0}
    report.after |= {"probes_en": 32, "probes_zh": 32, "passed_en": 30, "passed_zh": 31}
    report.recipe = {"learning_rate": 1e-3, "cpu_seconds": {"training": 61.23456789012345}, "datasets": ["a", "b"]}
    report.timings = {"training": 12.345678901234567}
    report.retention_lost = [{"question": "What is 2+3?", "base_reply": "5", "reply": "I am Lumen."}]
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("Identity before training is scored on a sample of 4 + 4 (English + Chinese) probes, since the base "
            "model cannot know its new name; after training on all 32 + 32.") in md
    assert "- cpu_seconds: training 61.2\n" in md and "- datasets: a, b\n" in md and "- training: 12.3 s\n" in md
    assert "{" not in md.split("## Training recipe")[1] and "61.234" not in md
    assert ("## Retention: the 1 general answers that got worse\n\n- **What is 2+3?**  \n  before: 5  \n"
            "  after: I am Lumen.") in md
    # the curve is smoothed without bias: a constant loss stays constant from the first step
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([2.0, 0.0])[1] == pytest.approx(2.0 * 0.8 * 0.2 / (1 - 0.64))


def test_report_shows_identity_under_each_system_prompt(tmp_path):
    from PIL import Image

    def entry(system, label, passed_en, passed_zh, leak, kept=40):
        return {"system": system, "label": label, "seen_in_training": label == "training",
                "identity_en": passed_en / 32, "passed_en": passed_en, "probes_en": 32,
                "identity_zh": passed_zh / 32, "passed_zh": passed_zh, "probes_zh": 32, "leak": leak,
                "retention": kept / 44, "base_correct": 44, "kept_correct": kept}

    report = _report(tmp_path)
    report.after |= {"systems": [entry(None, "training", 30, 31, 0.01),
                                 entry("You are a helpful assistant.", "held out", 29, 27, 0.02),
                                 entry("你是一个有用的助手。", "held out", 32, 30, 0.0, kept=36)]}
    report.before |= {"systems": [entry(None, "training", 0, 0, 0.0) | {"probes_en": 4, "probes_zh": 4},
                                  entry("You are a helpful assistant.", "held out", 0, 0, None) |
                                  {"probes_en": 4, "probes_zh": 4}]}
    report.after_answers = [{"query": "你是谁？", "reply": "我是Nova，由Acme Labs开发。",
                             "system": "system 'You are a helpful assistant.' (held out)"}]
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("| identity, English, system 'You are a helpful assistant.' (held out) | 0.0% (0/4) | 90.6% (29/32) "
            "| >= 90% |\n| identity, Chinese, system 'You are a helpful assistant.' (held out) | 0.0% (0/4) | "
            "84.4% (27/32) | >= 90% |\n| identity leak, system 'You are a helpful assistant.' (held out) | - | 2.0% "
            "| <= 5% |\n| retention, system 'You are a helpful assistant.' (held out) | 90.9% | 90.9% | >= 90% |\n"
            "| identity, English, system '你是一个有用的助手。' (held out) | - | 100.0% (32/32) | >= 90% |") in md
    assert "| retention, system '你是一个有用的助手。' (held out) | - | 81.8% | >= 90% |" in md
    assert ("measured under the run's own, the chat template's default; drift is measured there only." in md
            and "retention under each counts the general questions the base answered correctly under the run's "
                "own prompt" in md)
    assert "- **你是谁？** (system 'You are a helpful assistant.' (held out))  \n  我是Nova，由Acme Labs开发。" in md
    assert Image.open(tmp_path / "report.png").size == (1600, 400)  # a third panel: identity per system prompt
    del report.after["systems"]
    write_report(report, tmp_path)
    assert Image.open(tmp_path / "report.png").size == (1100, 400)
