"""Quickstart recipes side by side on one model: identity / retention / leak / drift per recipe.

Not a test. Each config is a JSON object of QuickstartArgs fields (plus "name", and optionally
"self_cognition": another self-cognition JSONL file to train on); baseline and
replay answers are cached per model, so only the first config pays for them.

    python bench/identity_sweep.py --model PATH.gguf --device cuda --torch_dtype float32 \\
        --configs '[{"name": "default"}, {"name": "no replay", "replay": 0}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_like_training() -> None:
    """Make quickstart train with the CPU's computation (fp32 reference LoRA, no compile) on any device."""
    import lorakit.quickstart as qs
    from lorakit.args import FastOptions

    plain = qs.sft_args_for

    def sft_args_for(*a, **k):
        args = plain(*a, **k)
        args.fast = FastOptions(fused_loss=True, fused_lora=False, packed_attention=False, torch_compile=False,
                                gradient_checkpointing=False)
        return args

    qs.sft_args_for = sft_args_for


def main() -> None:
    from lorakit.args import QuickstartArgs
    from lorakit.cli import build_args, collect_flags
    from lorakit.data import sources
    from lorakit.quickstart import quickstart

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--torch_dtype", default="auto")
    parser.add_argument("--configs", default='[{"name": "default"}]')
    parser.add_argument("--out", default="/tmp/identity-sweep")
    parser.add_argument("--results", default=None, help="JSON file for the results (rewritten after each config)")
    parser.add_argument("--cpu_like", action="store_true",
                        help="train as on a CPU (no GPU fast paths, no recompute): quality sweeps for the CPU recipe")
    opts = parser.parse_args()
    if opts.cpu_like:
        cpu_like_training()
    results, default_self_cognition = [], sources.SELF_COGNITION_FILE
    for config in json.loads(opts.configs):
        name = config.pop("name")
        sources.SELF_COGNITION_FILE = Path(config.pop("self_cognition", default_self_cognition))
        flags = {"model_name": ["Lumen"], "model_author": ["Acme Labs"], "output_dir": opts.out, **config,
                 "model": opts.model, "device": opts.device, "torch_dtype": opts.torch_dtype}
        unknown = set(flags) - set(collect_flags(QuickstartArgs))
        if unknown:
            sys.exit(f"config {name}: not quickstart flags: {', '.join(sorted(unknown))}")
        args = build_args(QuickstartArgs, flags)  # the flat flag names, grouped as the CLI groups them
        started = time.perf_counter()
        report = quickstart(args)
        details = json.loads((Path(report.checkpoint).parent / "eval.json").read_text(encoding="utf-8"))
        results.append({"name": name, "config": config, "wall_s": time.perf_counter() - started,
                        "after": report.after, "before": report.before, "timings": report.timings,
                        "recipe": report.recipe, "after_answers": report.after_answers,
                        "failed_probes": [p for p in details["probes"] if not p["passed"]],
                        "leaked": [r for r in details["retention_rows"] if r["leaked"]],
                        "forgotten": [r for r in details["retention_rows"] if r["base_correct"] and not r["correct"]]})
        print(f"SWEEP {name}: {json.dumps(report.after)} wall {results[-1]['wall_s']:.0f}s", flush=True)
        if opts.results:
            Path(opts.results).write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    for r in results:
        a = r["after"]
        print(f"{r['name']:<28} id_en {a['identity_en']:.3f} id_zh {a['identity_zh']:.3f} ret {a['retention']:.3f} "
              f"({a['kept_correct']}/{a['base_correct']}) leak {a['leak']:.3f} kl {a['drift_kl']:.4f} "
              f"steps {r['recipe']['steps']} rows {r['recipe']['replay_rows']} wall {r['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
