"""Reward functions: ms-swift's built-ins and your own, all with TRL's signature.

A reward function is a plain callable `fn(completions, **kwargs) -> list[float | None]`: one value per
completion (None: the function does not apply to it). Keyword arguments: `prompts` (the prompt
messages), `completion_ids` (token ids) and every column of the dataset row (`solution`, `answer`, ...).
Completions are the reply texts (strings), as ms-swift passes them. Your own come from
`--external_plugins my_rewards.py --reward_funcs my_fn`: the file is imported, the name looked up in
it; a class is instantiated once with no arguments (ms-swift's ORM classes work). No registration.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit.errors import UserError

RewardFn = Callable[..., list]


# ---------------------------------------------------------------- answers


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def final_answer(text: str) -> str | None:
    r"""The answer a text gives: its last \boxed{}, else the GSM8K '#### x' line, else its <answer> tag, else its
    last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip() if tags else None


def normalise_answer(answer: str) -> str:
    """Drop LaTeX wrapping, spaces, '$', thousands separators and a trailing period."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("^\\circ", "")
    s = s.replace("\\%", "").replace("%", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    s = s.replace("(", "").replace(")", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """Same answer: equal as numbers (exact fractions, or within 1e-6 relative), else equal normalised text."""
    p, r = normalise_answer(predicted), normalise_answer(reference)
    if p == r:
        return True
    pn, rn = _as_number(p), _as_number(r)
    if pn is not None and rn is not None:
        return pn == rn or math.isclose(float(pn), float(rn), rel_tol=1e-6)
    return False


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def is_correct(completion: str, solution: str) -> bool:
    """The completion's final answer equals the solution's (math-verify decides when it is installed)."""
    mv = _math_verify()
    if mv is not None:
        gold = mv.parse(solution)
        if gold:
            return bool(mv.verify(gold, mv.parse(completion)))
    predicted, reference = final_answer(completion), final_answer(solution)
    if predicted is None or reference is None:
        return False
    return answers_match(predicted, reference)


def _solutions(kwargs: dict[str, Any], n: int, name: str) -> list[str | None]:
    for column in ("solution", "answer", "ground_truth"):
        if column in kwargs:
            return [None if v is None else str(v) for v in kwargs[column]]
    raise UserError(f"--reward_funcs {name}: the dataset has no 'solution' or 'answer' column to compare the "
                    f"completions with. Add one, or use a reward function of your own (--external_plugins).")


# ---------------------------------------------------------------- built-ins (ms-swift names)


def accuracy(completions: list[str], **kwargs) -> list[float | None]:
    r"""1.0 when the completion's final answer (last \boxed{}, else its last number) equals the row's
    solution/answer, else 0.0; None for rows without one."""
    solutions = _solutions(kwargs, len(completions), "accuracy")
    return [None if s is None else float(is_correct(c, s)) for c, s in zip(completions, solutions)]


_FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 for '<think>...</think><answer>...</answer>' and nothing after, else 0.0."""
    return [1.0 if _FORMAT.match(c) else 0.0 for c in completions]


@dataclass
class Repetition:
    """-(share of repeated word n-grams) x max_penalty (ms-swift: --repetition_n_grams, --repetition_max_penalty)."""

    n_grams: int = 3
    max_penalty: float = -1.0

    def __call__(self, completions: list[str], **kwargs) -> list[float]:
        out = []
        for text in completions:
            words = text.lower().split()
            if len(words) < self.n_grams:
                out.append(0.0)
                continue
            grams = list(zip(*[words[i:] for i in range(self.n_grams)]))
            out.append((1 - len(set(grams)) / len(grams)) * self.max_penalty)
        return out


@dataclass
class SoftOverlong:
    """DAPO's soft length penalty: 0 up to soft_max_length - soft_cache_length tokens, then falling linearly to -1
    at soft_max_length."""

    soft_max_length: int
    soft_cache_length: int

    def __call__(self, completions: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]:
        expected = self.soft_max_length - self.soft_cache_length
        return [min(-(len(ids) - expected) / self.soft_cache_length, 0.0) for ids in completion_ids]


@dataclass
class Cosine:
    """Accuracy scaled by length on a cosine (ms-swift/open-r1): short correct answers earn most, short wrong ones
    lose most; at max_len a correct answer earns max_len_value_correct and a wrong one max_len_value_wrong."""

    max_len: int
    min_len_value_wrong: float = -0.5
    max_len_value_wrong: float = 0.0
    min_len_value_correct: float = 1.0
    max_len_value_correct: float = 0.5

    def __call__(self, completions: list[str], completion_ids: list[list[int]], **kwargs) -> list[float | None]:
        solutions = _solutions(kwargs, len(completions), "cosine")
        out: list[float | None] = []
        for text, ids, solution in zip(completions, completion_ids, solutions):
            if solution is None:
                out.append(None)
                continue
            if is_correct(text, solution):
                low, high = self.max_len_value_correct, self.min_len_value_correct
            else:
                low, high = self.max_len_value_wrong, self.min_len_value_wrong
            out.append(low + 0.5 * (high - low) * (1 + math.cos(math.pi * len(ids) / self.max_len)))
        return out


BUILTIN_NAMES = ("accuracy", "format", "repetition", "soft_overlong", "cosine")


@dataclass
class RewardSettings:
    """Parameters of the built-ins that take some (flags of the same names)."""

    max_completion_length: int = 512
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0
    soft_max_length: int | None = None
    soft_cache_length: int | None = None
    cosine_max_len: int | None = None
    cosine_min_len_value_wrong: float = -0.5
    cosine_max_len_value_wrong: float = 0.0
    cosine_min_len_value_correct: float = 1.0
    cosine_max_len_value_correct: float = 0.5


def builtin(name: str, settings: RewardSettings) -> RewardFn:
    """A built-in reward function by its ms-swift name."""
    if name == "accuracy":
        return accuracy
    if name == "format":
        return format_reward
    if name == "repetition":
        return Repetition(settings.repetition_n_grams, settings.repetition_max_penalty)
    if name == "soft_overlong":
        if not settings.soft_cache_length:
            raise UserError("--reward_funcs soft_overlong needs --soft_cache_length N: the penalty ramps from 0 at "
                            "soft_max_length - N tokens to -1 at --soft_max_length (default --max_completion_length).")
        return SoftOverlong(settings.soft_max_length or settings.max_completion_length, settings.soft_cache_length)
    if name == "cosine":
        return Cosine(settings.cosine_max_len or settings.max_completion_length, settings.cosine_min_len_value_wrong,
                      settings.cosine_max_len_value_wrong, settings.cosine_min_len_value_correct,
                      settings.cosine_max_len_value_correct)
    raise KeyError(name)


# ---------------------------------------------------------------- your own


@dataclass
class RewardFunction:
    """A resolved reward function and where it came from (for logs and errors)."""

    name: str
    fn: RewardFn
    origin: str  # "built-in" or the plugin file


def load_plugins(paths: list[str]) -> list[tuple[Path, Any]]:
    """Import each --external_plugins file as a module of its own; (path, module) pairs."""
    modules = []
    for i, text in enumerate(paths):
        path = Path(text).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"--external_plugins {text}: no such file: {path}")
        spec = importlib.util.spec_from_file_location(f"lorakit_plugin_{i}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # the plugin may import its neighbours
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise UserError(f"--external_plugins {path}: importing it failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.remove(str(path.parent))
        modules.append((path, module))
    return modules


def resolve_reward_funcs(names: list[str], plugins: list[str], settings: RewardSettings) -> list[RewardFunction]:
    """Each --reward_funcs name as a callable: a plugin's function of that name first, else a built-in."""
    modules = load_plugins(plugins)
    out = []
    for name in names:
        found = [(path, getattr(m, name)) for path, m in modules if callable(getattr(m, name, None))]
        if found:
            path, obj = found[-1]
            fn = obj() if isinstance(obj, type) else obj
            out.append(RewardFunction(name, fn, str(path)))
        elif name in BUILTIN_NAMES:
            out.append(RewardFunction(name, builtin(name, settings), "built-in"))
        else:
            defined = sorted({n for _, m in modules for n, v in vars(m).items()
                              if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == m.__name__})
            where = (f"; functions in --external_plugins: {', '.join(defined)}" if defined
                     else "; no --external_plugins file defines it")
            raise UserError(f"--reward_funcs {name}: unknown reward function. Built-in: {', '.join(BUILTIN_NAMES)}"
                            f"{where}. Your own: --external_plugins my_rewards.py --reward_funcs my_fn, where my_fn("
                            f"completions, **kwargs) returns one float (or None) per completion.")
    return out


@dataclass
class RewardInputs:
    """What the reward functions see for N completions (column values aligned with the completions)."""

    completions: list[str]
    completion_ids: list[list[int]]
    prompts: list[list[dict[str, str]]]
    columns: dict[str, list[Any]]
    sources: list[str]  # "file:line" of each completion's dataset row, for errors


def compute_rewards(funcs: list[RewardFunction], inputs: RewardInputs) -> torch.Tensor:
    """[N, F] float64 rewards (NaN where a function returned None); a failing function is a UserError naming it."""
    n = len(inputs.completions)
    out = torch.full((n, len(funcs)), float("nan"), dtype=torch.float64)
    for j, func in enumerate(funcs):
        values = _call(func, inputs, list(range(n)))
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{type(values).__name__} of length {len(values)}" if hasattr(values, "__len__") else repr(values)
            raise UserError(f"reward function {func.name} ({func.origin}) returned {got:.200}; it must return a list "
                            f"with one float (or None) per completion ({n}).")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                out[i, j] = float(v)
            except (TypeError, ValueError):
                raise UserError(f"reward function {func.name} ({func.origin}) returned {v!r} for completion {i} "
                                f"({inputs.sources[i]}): rewards must be numbers or None.") from None
    return out


def _call(func: RewardFunction, inputs: RewardInputs, rows: list[int]):
    kwargs = {k: [v[i] for i in rows] for k, v in inputs.columns.items()}
    kwargs.update(prompts=[inputs.prompts[i] for i in rows], completion_ids=[inputs.completion_ids[i] for i in rows])
    try:
        return func.fn([inputs.completions[i] for i in rows], **kwargs)
    except UserError:
        raise
    except Exception as exc:
        if len(rows) > 1:  # find the first completion it fails on alone, to name it
            for i in rows:
                try:
                    _call(func, inputs, [i])
                except UserError:
                    raise
        raise UserError(
            f"reward function {func.name} ({func.origin}) raised {type(exc).__name__}: {exc}"
            + (f" on the completion of {inputs.sources[rows[0]]}: {inputs.completions[rows[0]][:120]!r}"
               if len(rows) == 1 else " on the batch (each completion alone passes)")
            + ". Fix the function and re-run; checkpoints already saved are kept (resume with "
              "--resume_from_checkpoint).") from exc
