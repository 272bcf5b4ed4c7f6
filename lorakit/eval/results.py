"""What an eval returns: every figure and the replies behind them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ProbeResult:
    query: str
    lang: str
    reply: str
    passed: bool


@dataclass
class RetentionResult:
    question: str
    lang: str
    base_reply: str
    reply: str
    base_correct: bool
    correct: bool
    leaked: bool


@dataclass
class SystemResult:
    """Identity, leak and retention under one more system prompt than the run's own."""

    system: str | None
    "The system prompt; None: no system turn (the template's default)."
    label: str
    "'template default' or 'held out' (data/system_prompts.py: no training row uses it)."
    seen_in_training: bool
    identity: dict[str, float]
    "Share of held-out probes passed under this system prompt, per language."
    leak: float | None
    "Share of general answers under this system prompt that name the new identity (None: not asked, a base model)."
    probes: list[ProbeResult] = field(default_factory=list)
    retention: float | None = None
    """Of the general questions the base answered correctly under the run's own prompt, the share the model answers
    correctly under this one (None: not asked, a base model)."""
    base_correct: int = 0
    kept_correct: int = 0
    retention_rows: list[RetentionResult] = field(default_factory=list)

    def figures(self) -> dict:
        """The headline numbers, with the counts behind each identity share and the retention."""
        return {"system": self.system, "label": self.label, "seen_in_training": self.seen_in_training,
                **identity_figures(self.identity, self.probes), "leak": self.leak, "retention": self.retention,
                "base_correct": self.base_correct, "kept_correct": self.kept_correct}


def identity_share(probes: list[ProbeResult]) -> dict[str, float]:
    """Share of probes passed, per language ('en', 'zh'); 0 for a language with no probe."""
    out = {}
    for lang in ("en", "zh"):
        passed = [p.passed for p in probes if p.lang == lang]
        out[lang] = sum(passed) / len(passed) if passed else 0.0
    return out


def identity_figures(identity: dict[str, float], probes: list[ProbeResult]) -> dict:
    """identity_en/zh with passed_en/zh and probes_en/zh: the counts behind each share."""
    out = {}
    for lang in ("en", "zh"):
        asked = [p.passed for p in probes if p.lang == lang]
        out |= {f"identity_{lang}": identity.get(lang), f"passed_{lang}": sum(asked), f"probes_{lang}": len(asked)}
    return out


@dataclass
class EvalResult:
    """Every figure of one eval, and the replies behind them."""

    identity: dict[str, float]
    "Share of held-out probes passed, per language ('en', 'zh')."
    retention: float | None
    "Of the questions the base answered correctly, the share the model still answers correctly (None: base got none)."
    base_correct: int
    kept_correct: int
    leak: float
    "Share of answers to general questions that mention the new name or author."
    drift_kl: float
    "Mean per-token KL(base || model) on the base's own answers to DRIFT_QUESTIONS general questions, teacher-forced."
    name: list[str]
    author: list[str]
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    "Wall seconds per part of the eval (replies, base answers, drift)."
    probes: list[ProbeResult] = field(default_factory=list)
    retention_rows: list[RetentionResult] = field(default_factory=list)
    system: str | None = None
    "The run's own system prompt, which every figure above is measured under (None: the template's default)."
    other_systems: list[SystemResult] = field(default_factory=list)
    "Identity, leak and retention under the other system prompts of data/system_prompts.eval_systems."

    def figures(self) -> dict:
        """The headline numbers; "systems": identity, leak and retention per system prompt, the run's own first."""
        own = {"system": self.system, "label": "training", "seen_in_training": True,
               **identity_figures(self.identity, self.probes), "leak": self.leak, "retention": self.retention,
               "base_correct": self.base_correct, "kept_correct": self.kept_correct}
        return {"identity_en": self.identity.get("en"), "identity_zh": self.identity.get("zh"),
                "retention": self.retention, "leak": self.leak, "drift_kl": self.drift_kl,
                "base_correct": self.base_correct, "kept_correct": self.kept_correct,
                **{k: v for k, v in own.items() if k.startswith(("probes_", "passed_"))},
                "systems": [own] + [s.figures() for s in self.other_systems]}

    def to_json(self) -> dict:
        return asdict(self) | {"figures": self.figures()}
