"""Quickstart recipes side by side on one model: identity / retention / leak / drift per recipe.

Not a test. Each config is a JSON object of QuickstartArgs fields (plus "name"); baseline and
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


def main() -> None:
    from lorakit.args import ModelArgs, QuickstartArgs
    from lorakit.quickstart import quickstart

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--torch_dtype", default="auto")
    parser.add_argument("--configs", default='[{"name": "default"}]')
    parser.add_argument("--out", default="/tmp/identity-sweep")
    parser.add_argument("--results", default=None, help="JSON file for the results (rewritten after each config)")
    opts = parser.parse_args()
    results = []
    for config in json.loads(opts.configs):
        name = config.pop("name")
        args = QuickstartArgs(model=ModelArgs(model=opts.model, device=opts.device, torch_dtype=opts.torch_dtype),
                              model_name=config.pop("model_name", ["Lumen"]),
                              model_author=config.pop("model_author", ["Acme Labs"]), output_dir=opts.out, **config)
        started = time.perf_counter()
        report = quickstart(args)
        results.append({"name": name, "config": config, "wall_s": time.perf_counter() - started,
                        "after": report.after, "before": report.before, "timings": report.timings,
                        "recipe": report.recipe, "after_answers": report.after_answers})
        print(f"SWEEP {name}: {json.dumps(report.after)} wall {results[-1]['wall_s']:.0f}s", flush=True)
        if opts.results:
            Path(opts.results).write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    for r in results:
        a = r["after"]
        print(f"{r['name']:<28} id_en {a['identity_en']:.3f} id_zh {a['identity_zh']:.3f} ret {a['retention']} "
              f"leak {a['leak']:.3f} kl {a['drift_kl']:.4f} steps {r['recipe']['steps']} wall {r['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
