"""The parts of `lorakit eval` (lorakit/evaluate.py runs them): scoring (pure functions on reply
text), results (the dataclasses an eval returns), drift (teacher-forced KL against the base) and
reply_cache (a base model's replies kept on disk). The advice for missed targets lives with the
targets in lorakit/report.py."""
