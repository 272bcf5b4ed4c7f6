"""The preference-data report: what `rlhf` trains on, printed by `rlhf` (and `--dry_run`) and by
`check-data` when the rows are preference rows.

Per dataset: the location, the shapes detected, rows read / kept / dropped (and why) / truncated,
the split, and one example with BOTH sides rendered as the model sees them, the loss-bearing
answer marked.
"""

from __future__ import annotations

import os
import sys

from lorakit.data.check import load_tokenizer_only, mark_loss_spans
from lorakit.data.loading import MAX_LISTED_ERRORS
from lorakit.rlhf.data import PreferenceData, PreferenceReport, RenderedPair, load_preference_data


def format_preference_report(data: PreferenceData, tokenizer, *, color: bool = False) -> str:
    """The report as text."""
    lines = []
    for report in data.reports:
        lines += _dataset_lines(report, tokenizer, color)
        lines.append("")
    unit = "pairs" if data.train and isinstance(data.train[0], RenderedPair) else "examples"
    lines.append(f"total: {len(data.train)} training {unit}, {len(data.val)} validation {unit}")
    if any(r.errors for r in data.reports):
        lines.append(f"NOT READY: {sum(1 for r in data.reports if r.errors)} dataset(s) with errors; fix them first.")
    return "\n".join(lines)


def _dataset_lines(r: PreferenceReport, tokenizer, color: bool) -> list[str]:
    formats = ", ".join(f"{name} ({n} rows)" for name, n in r.formats.items()) or "none detected"
    out = [f"{r.role} dataset: {r.location}", f"  format: {formats}",
           f"  rows: {r.rows_read} read, {r.rows_sampled} after sampling, {r.kept} kept, "
           f"{sum(r.dropped.values())} dropped, {r.truncated} truncated (answer cut to --max_length)"]
    if r.role == "train":
        out.append(f"  split: {r.train_rows} train, {r.val_rows} validation")
    out += [f"    dropped {n}: {why}" for why, n in r.dropped.items()]
    if r.errors:
        out.append(f"  ERRORS ({len(r.errors)}):")
        out += [f"    {e}" for e in r.errors[:MAX_LISTED_ERRORS]]
        if len(r.errors) > MAX_LISTED_ERRORS:
            out.append(f"    ... and {len(r.errors) - MAX_LISTED_ERRORS} more")
    ex = r.example
    if ex is not None:
        how = "highlighted" if color else "inside [[ ]]"
        if isinstance(ex, RenderedPair):
            sides = [("chosen", ex.chosen), ("rejected", ex.rejected)]
        else:
            sides = [("desirable" if ex.desirable else "undesirable", ex.completion)]
        out.append(f"  example ({ex.source}), as the model sees it (the loss-bearing answer is {how}):")
        for name, sample in sides:
            out.append(f"   {name}:")
            out += ["    " + line for line in mark_loss_spans(tokenizer, sample, color=color).rstrip("\n").split("\n")]
    return out


def main(args) -> int:
    """check-data on preference rows (args: CheckDataArgs or RlhfArgs); exit 1 when not ready."""
    tokenizer = load_tokenizer_only(args.model)
    rlhf_type = args.rlhf.rlhf_type if hasattr(args, "rlhf") else "auto"
    data = load_preference_data(args.data, tokenizer, rlhf_type=rlhf_type, batch_size=1, use_hf=args.model.use_hf,
                                template=args.model.template, strict=False,
                                log=lambda m: print(m, file=sys.stderr))
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    print(format_preference_report(data, tokenizer, color=color))
    return 1 if any(r.errors for r in data.reports) or not data.train else 0
