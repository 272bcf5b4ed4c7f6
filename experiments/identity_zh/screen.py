"""Screen self-cognition / replay variants for identity under many system prompts (not a test).

Trains as `lorakit quickstart` does (same recipe, replay answers from the cache) and asks the 64
held-out probes under SCREEN_SYSTEMS: the run's own, the two HELD_OUT_SYSTEMS and more prompts no
training row uses. Retention and leak are left to a real quickstart run of the chosen variant.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/identity_zh/screen.py --variants default,context \
        --out experiments/identity_zh/screen.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lorakit.data.system_prompts as sp  # noqa: E402
import lorakit.model as model_lib  # noqa: E402
import lorakit.quickstart as qs  # noqa: E402
from lorakit.args import QuickstartArgs  # noqa: E402
from lorakit.cli import build_args  # noqa: E402
from lorakit.data.render import render_prompt  # noqa: E402
from lorakit.eval.scoring import identity_pass  # noqa: E402
from lorakit.evaluate import load_probes  # noqa: E402
from lorakit.infer.replies import greedy_replies  # noqa: E402
from lorakit.replay import answers_to_samples, replay_answers  # noqa: E402
from lorakit.train import train  # noqa: E402

SCREEN_SYSTEMS = [None, "You are a helpful assistant.", "你是一个有用的助手。",
                  "You are a knowledgeable assistant. Answer clearly and briefly.",
                  "你是一名专业的客服助手，请礼貌地回答用户。", "Always reply in a polite, professional tone.", ""]

VARIANTS: dict[str, dict] = {
    "default": {},
    # replay targets: the base's answers under the run's own prompt, learned under the mix's prompts
    "context": {"replay": "context"},
    # replay rows all under the run's own prompt (the pre-mix replay)
    "own": {"replay": "own"},
    "noecho": {"replay": "noecho"},
}


def replay_for(mode: str, model, tokenizer, n: int):
    cache = model_lib.CACHE_DIR / "replay"
    if mode == "mix":
        return replay_answers(model, tokenizer, n, system=None, cache_dir=cache,
                              max_new_tokens=qs.REPLAY_MAX_NEW_TOKENS)
    mix = sp.system_mix
    sp.system_mix = lambda k, run_system: [run_system] * k
    import lorakit.replay as rp
    rp.system_mix = sp.system_mix
    try:
        answers = replay_answers(model, tokenizer, n, system=None, cache_dir=cache,
                                 max_new_tokens=qs.REPLAY_MAX_NEW_TOKENS)
    finally:
        sp.system_mix = rp.system_mix = mix
    if mode == "own":
        return answers
    if mode == "noecho":  # drop the answers that only repeat the question (the base had none)
        answers = [a for a in answers if a.text[:6] != a.prompt[:6]]
    systems = mix(len(answers), None)
    return [a if s is None else replace(a, system=s, prompt_ids=render_prompt(
        tokenizer, [{"role": "user", "content": a.prompt}], system=s)) for a, s in zip(answers, systems)]


def weigh_chinese_identity(weight: float) -> None:
    """Chinese identity rows' answer tokens learned at `weight` times a label's loss (as one-hot teacher targets)."""
    import lorakit.train as train_lib

    plain = train_lib.load_data

    def load_data(args, tokenizer):
        data = plain(args, tokenizer)
        for sample in data.train:
            answer = [t for t in sample.labels if t != -100]
            if "开发的AI助手" in tokenizer.decode(answer):
                sample.teacher = {i: ([t], [weight]) for i, t in enumerate(sample.labels) if t != -100}
        return data

    train_lib.load_data = load_data


def run(name: str, variant: dict, opts) -> dict:
    if "zh_identity_weight" in variant:
        weigh_chinese_identity(variant["zh_identity_weight"])
    if "training_systems" in variant:
        sp.TRAINING_SYSTEMS = tuple(variant["training_systems"])
    args = build_args(QuickstartArgs, {"model_name": ["Nova"], "model_author": ["Acme Labs"],
                                       "output_dir": opts.tmp, "seed": variant.get("seed", 42)})
    started = time.perf_counter()
    base = qs.load_base(args)
    model, tokenizer = base.model, base.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    answers = replay_for(variant.get("replay", "mix"), model, tokenizer, 310)
    targets = qs.lora_targets(args, model, n_params)
    n_layers = model.config.num_hidden_layers
    del base, model
    recipe = qs.choose_recipe(qs.self_cognition_rows() + len(answers), n_params, "cpu", n_layers=n_layers,
                              target_modules=targets, replay_weight_zh=variant.get("replay_weight_zh"))
    samples = answers_to_samples(answers, weight=recipe.replay_weight, weight_zh=recipe.replay_weight_zh)
    result = train(qs.sft_args_for(args, recipe, ["self-cognition"], replay=len(answers)), replay=samples)
    trained = time.perf_counter() - started
    probes = load_probes()
    prompts = [render_prompt(result.tokenizer, [{"role": "user", "content": p["query"]}], system=s)
               for s in SCREEN_SYSTEMS for p in probes]
    replies = greedy_replies(result.model, result.tokenizer, prompts, max_new_tokens=40, desc="screen")
    by_system, failed = [], []
    for k, s in enumerate(SCREEN_SYSTEMS):
        got = replies[k * len(probes):(k + 1) * len(probes)]
        passed = {"en": [], "zh": []}
        for p, r in zip(probes, got):
            ok = identity_pass(r.text, ["Nova"], ["Acme Labs"])
            passed[p["lang"]].append(ok)
            if not ok:
                failed.append({"system": s, "query": p["query"], "reply": r.text[:80]})
        by_system.append({"system": s, **{lang: round(100 * sum(v) / len(v), 1) for lang, v in passed.items()}})
    sp.TRAINING_SYSTEMS = ORIGINAL_SYSTEMS
    return {"name": name, "variant": variant, "steps": result.steps, "train_s": round(trained, 1),
            "wall_s": round(time.perf_counter() - started, 1), "load": os.getloadavg()[0], "systems": by_system,
            "failed": failed}


ORIGINAL_SYSTEMS = sp.TRAINING_SYSTEMS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="default")
    parser.add_argument("--extra", default=None, help="JSON object of more variants")
    parser.add_argument("--out", default=str(Path(__file__).with_name("screen.jsonl")))
    parser.add_argument("--tmp", default="/tmp/identity-screen")
    opts = parser.parse_args()
    variants = dict(VARIANTS, **json.loads(opts.extra or "{}"))
    for name in opts.variants.split(","):
        record = run(name, variants[name], opts)
        with open(opts.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        rows = "  ".join(f"{str(s['system'])[:14]!r}:{s['en']}/{s['zh']}" for s in record["systems"])
        print(f"SCREEN {name} train {record['train_s']}s: {rows}", flush=True)


if __name__ == "__main__":
    main()
