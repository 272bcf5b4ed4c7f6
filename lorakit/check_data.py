"""`lorakit check-data`: the report of what training would read, loading only the tokenizer.

Preference rows (chosen/rejected, KTO labels) get the report `lorakit rlhf` prints (rlhf/check.py);
any other rows get sft's (data/check.py).
"""

from __future__ import annotations

from lorakit.data import check as sft_check
from lorakit.rlhf import check as preference_check
from lorakit.rlhf.data import holds_preference_rows


def main(args) -> int:
    """Entry point for `lorakit check-data` (args: CheckDataArgs / SftArgs); exit 1 when not ready."""
    if holds_preference_rows(args.data.dataset, use_hf=args.model.use_hf):
        return preference_check.main(args)  # both sides of a pair, as `lorakit rlhf` trains on them
    return sft_check.main(args)
