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

    def figures(self) -> dict:
        """The headline numbers only."""
        asked = {lang: [p.passed for p in self.probes if p.lang == lang] for lang in ("en", "zh")}
        return {"identity_en": self.identity.get("en"), "identity_zh": self.identity.get("zh"),
                "retention": self.retention, "leak": self.leak, "drift_kl": self.drift_kl,
                "base_correct": self.base_correct, "kept_correct": self.kept_correct,
                "probes_en": len(asked["en"]), "probes_zh": len(asked["zh"]),
                "passed_en": sum(asked["en"]), "passed_zh": sum(asked["zh"])}

    def to_json(self) -> dict:
        return asdict(self) | {"figures": self.figures()}
