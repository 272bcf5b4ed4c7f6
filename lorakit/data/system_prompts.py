"""The system prompts identity is trained and evaluated under.

A deployment sets its own system prompt (or none), so an identity learned under one prompt only
does not hold: SmolLM2 trained under its template's default answered "我是Nova。" (no author) with
"You are a helpful assistant." at inference. The built-in self-cognition rows and the replay rows
are therefore spread over TRAINING_SYSTEMS (as ms-swift and LLaMA-Factory users mix system prompts
into self-cognition data), and `lorakit eval` also asks under HELD_OUT_SYSTEMS, which no training
row uses, so what it reports is the identity holding under a prompt the model never saw. A replay
row's target stays the base's answer under the run's own prompt whatever prompt the row is rendered
under (lorakit/replay.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass

# None: the run's own system prompt (--system, else the template's default). It keeps the largest share,
# so the figures under the training prompt (identity, retention, leak) keep most of their rows.
TRAINING_SYSTEMS: tuple[str | None, ...] = (
    None,
    "You are a helpful, respectful and honest assistant.",
    None,
    "你是一个人工智能助手。",
    None,
    "You are an AI assistant. Answer the user's questions accurately and concisely.",
    "你是一个乐于助人的AI助手，请认真回答用户的问题。",
    "You are a friendly chatbot.",
)

# Never in training: the most common generic prompts, in English (Qwen's default, and the --system of
# ms-swift's self-cognition tutorial) and in Chinese.
HELD_OUT_SYSTEMS: tuple[str, ...] = ("You are a helpful assistant.", "你是一个有用的助手。")


def training_system(index: int) -> str | None:
    """The system prompt of training row `index` (None: the run's own), cycling through TRAINING_SYSTEMS."""
    return TRAINING_SYSTEMS[index % len(TRAINING_SYSTEMS)]


def system_mix(n: int, run_system: str | None) -> list[str | None]:
    """The system prompts of n training rows: TRAINING_SYSTEMS in turn, None replaced by `run_system`."""
    return [run_system if s is None else s for s in map(training_system, range(n))]


@dataclass(frozen=True)
class EvalSystem:
    """One system prompt eval asks the identity probes under."""

    system: str | None
    "The text; None: no system turn (the chat template's default, if it has one)."
    label: str
    "'training' (the run's own), 'template default' or 'held out'."

    @property
    def seen_in_training(self) -> bool:
        """Whether the built-in training mix holds rows under this prompt."""
        return self.label == "training" or (self.system is not None and self.system in TRAINING_SYSTEMS)


def eval_systems(run_system: str | None) -> list[EvalSystem]:
    """The run's own system prompt first, then the template's default (when the run set its own) and
    HELD_OUT_SYSTEMS, each prompt once."""
    out = [EvalSystem(run_system, "training")]
    if run_system is not None:
        out.append(EvalSystem(None, "template default"))
    out += [EvalSystem(s, "held out") for s in HELD_OUT_SYSTEMS if s != run_system]
    return out
