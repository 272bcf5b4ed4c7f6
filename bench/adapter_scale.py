"""Evaluate a trained adapter at several strengths: identity / retention / leak / drift per LoRA scale.

Not a test. Scaling every LoRA delta by s < 1 after training moves the weights back toward the base
along the training direction (weight-space interpolation, as in WiSE-FT): a learned identity whose
answers are near-certain may survive while small general-answer shifts shrink. This measures whether
it does, on checkpoints that `lorakit quickstart` (or bench/identity_sweep.py) wrote.

    python bench/adapter_scale.py RUN_OR_CHECKPOINT [...] --scales 1 0.9 0.8 0.7 [--results out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def main() -> None:
    from lorakit.checkpoint import load_checkpoint
    from lorakit.evaluate import _checkpoint_identity, evaluate
    from lorakit.model import CACHE_DIR

    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7])
    parser.add_argument("--device", default=None)
    parser.add_argument("--results", default=None)
    opts = parser.parse_args()
    results = []
    for path in opts.checkpoints:
        loaded = load_checkpoint(path, device=opts.device)
        name, author = _checkpoint_identity(loaded.args)
        layers = lora_layers(loaded.model)
        original = [dict(layer.scaling) for layer in layers]
        for s in opts.scales:
            for layer, scaling in zip(layers, original):
                layer.scaling.update({k: v * s for k, v in scaling.items()})
            r = evaluate(loaded.model, loaded.tokenizer, name=name, author=author, system=loaded.args.get("system"),
                         cache_dir=CACHE_DIR / "quickstart")
            row = {"checkpoint": str(loaded.path), "scale": s, "identity_en": r.identity["en"],
                   "identity_zh": r.identity["zh"], "retention": r.retention, "kept": r.kept_correct,
                   "base_correct": r.base_correct, "leak": r.leak, "drift_kl": r.drift_kl,
                   "failed_probes": [p.query for p in r.probes if not p.passed],
                   "forgotten": [x.question for x in r.retention_rows if x.base_correct and not x.correct]}
            results.append(row)
            print(f"SCALE {loaded.path.parent.name} s={s:.2f}: id_en {row['identity_en']:.3f} id_zh "
                  f"{row['identity_zh']:.3f} ret {row['retention']:.3f} ({row['kept']}/{row['base_correct']}) "
                  f"leak {row['leak']:.3f} kl {row['drift_kl']:.4f}", flush=True)
            if opts.results:
                Path(opts.results).write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
