"""Collect quickstart runs' figures into one JSON line each (not a test).

Each RUN is TAG=FOLDER, FOLDER holding the quickstart's output_dir (output/v*/report.json) and, when the run
was timed from outside, `start` / `end` files (epoch seconds: the wall time of the whole command).

    python experiments/identity_zh/collect.py base-s1=/tmp/identity-runs/base-s1 ... >> experiments/identity_zh/quickstart.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def figures(tag: str, folder: Path) -> dict:
    """identity EN/ZH, retention and leak per scored system prompt, drift, stage times, wall time."""
    (report_path,) = folder.glob("output/v*/report.json")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    after, recipe = report["after"], report["recipe"]
    wall = None
    if (folder / "start").is_file() and (folder / "end").is_file():
        wall = int((folder / "end").read_text()) - int((folder / "start").read_text())
    systems = [{"system": s["system"], "label": s["label"], "identity_en": round(100 * s["identity_en"], 1),
                "identity_zh": round(100 * s["identity_zh"], 1), "retention": round(100 * s["retention"], 1),
                "leak": round(100 * s["leak"], 1)} for s in after["systems"]]
    args = json.loads((report_path.parent / "args.json").read_text(encoding="utf-8"))
    return {"tag": tag, "name": report["name"], "seed": args["data"]["seed"],
            "self_cognition_weight_zh": recipe.get("self_cognition_weight_zh", 1.0),
            "replay_weight": recipe["replay_weight"], "replay_weight_zh": recipe["replay_weight_zh"],
            "steps": recipe["steps"], "systems": systems, "drift_kl": round(after["drift_kl"], 4),
            "missed": report["missed"], "timings_s": {k: round(v, 1) for k, v in report["timings"].items()},
            "cpu_s": {k: round(v, 1) for k, v in recipe["cpu_seconds"].items()}, "wall_s": wall,
            "report": str(report_path)}


def main() -> None:
    for arg in sys.argv[1:]:
        tag, _, folder = arg.partition("=")
        print(json.dumps(figures(tag, Path(folder)), ensure_ascii=False))


if __name__ == "__main__":
    main()
