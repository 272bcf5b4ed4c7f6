"""Form values -> the exact `lorakit COMMAND --flag value ...` argument list, checked with the CLI's own rules.

The page never re-implements a command: it writes the flags a user would type, shows them, and runs
them. A value is checked by `lorakit.cli.parse_argv` and the command's args dataclass (the same
`__post_init__` validation the terminal gets), so a bad value fails here with the CLI's own message,
before any process starts. Paths are resolved against the working directory and written absolute.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorakit import args as lorakit_args
from lorakit import cli
from lorakit.args import ALIASES
from lorakit.errors import UserError

# The fields of the Train form, in the order shown (each is a flag of sft; quickstart and rlhf take a subset).
TRAIN_FIELDS = (
    "model", "adapters", "dataset", "model_name", "model_author", "train_type", "lora_rank", "lora_alpha", "target_modules",
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "logging_steps", "save_steps", "beta", "system", "seed", "output_dir",
)
PATH_FIELDS = ("model", "dataset", "output_dir", "adapters", "system")
_SEPARATORS = {  # how a list field's text splits into values (a name may hold spaces: "Xiao Huang")
    "adapters": r"\n", "dataset": r"[\n,]", "val_dataset": r"[\n,]", "model_name": r"[\n,]", "model_author": r"[\n,]",
}
_DEFAULT_SEPARATOR = r"[\s,]+"
# Training methods: the label in the form -> (command, the flags that select the method).
BASE_METHODS = {"quickstart (identity)": ("quickstart", ()), "sft": ("sft", ())}
# Flags a command refuses to run without, checked when it starts (quickstart's own check comes after the model loads).
REQUIRED = {"quickstart": ("model_name", "model_author")}


def methods() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The training methods the installed CLI has: quickstart, sft, and `rlhf` types when that command exists."""
    found = dict(BASE_METHODS)
    if "rlhf" in cli.COMMANDS and "rlhf_type" in flags_of("rlhf"):
        kinds = getattr(lorakit_args, "RLHF_TYPES", None) or (flags_of("rlhf")["rlhf_type"].default,)
        found.update({f"rlhf {kind}": ("rlhf", ("--rlhf_type", kind)) for kind in kinds})
    return found


@dataclass
class Command:
    """One `lorakit COMMAND --flag value ...` invocation."""

    command: str
    flags: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        """What a user types: ["lorakit", COMMAND, flags...]."""
        return ["lorakit", self.command, *self.flags]

    def process_argv(self) -> list[str]:
        """The same command for the Python that runs this page (no reliance on PATH)."""
        return [sys.executable, "-m", "lorakit.cli", self.command, *self.flags]

    def text(self) -> str:
        """The command as it would be typed in a terminal (quoted where needed)."""
        return shlex.join(self.argv())


@dataclass
class Problem:
    """A value the command would refuse: the form field it belongs to ('' for the extra flags) and the CLI's words."""

    field: str
    message: str


def flags_of(command: str) -> dict[str, cli.Flag]:
    """{flag name: Flag} of a command, straight from its args dataclass."""
    return cli.collect_flags(cli.COMMANDS[command][1])


def default_text(flag: cli.Flag) -> str:
    """A flag's default as the form shows it ('' for none)."""
    if flag.default is None:
        return ""
    if isinstance(flag.default, list):
        return " ".join(map(str, flag.default)) if flag.name not in _SEPARATORS else ", ".join(map(str, flag.default))
    if isinstance(flag.default, bool):
        return "true" if flag.default else "false"
    return str(flag.default)


def defaults(command: str, fields=TRAIN_FIELDS) -> dict[str, str]:
    """The form's starting text for each field the command takes."""
    flags = flags_of(command)
    return {name: default_text(flags[name]) for name in fields if name in flags}


def split_words(name: str, text: str) -> list[str]:
    """A list field's text -> its values."""
    return [w.strip() for w in re.split(_SEPARATORS.get(name, _DEFAULT_SEPARATOR), text) if w.strip()]


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..") or text.endswith(
        (".json", ".jsonl", ".csv", ".parquet", ".gguf", ".txt"))


def resolve_path(name: str, text: str, cwd: Path) -> str:
    """An existing file or folder -> its absolute path; a hub ID or built-in name stays; a missing path is an error."""
    if name == "system":  # a prompt text, or a .txt file holding one
        path = (cwd / Path(text).expanduser())
        return str(path.resolve()) if text.endswith(".txt") and path.is_file() else text
    spec, count = text, ""
    if name in ("dataset", "val_dataset") and re.fullmatch(r".+#\d+", text):
        spec, _, count = text.rpartition("#")
        count = "#" + count
    path = (cwd / Path(spec).expanduser()).resolve()
    if name == "output_dir" or path.exists():
        return str(path) + count
    if _looks_like_path(spec):
        raise UserError(f"--{name} {text}: no such file or folder: {path}")
    return text  # a hub ID or a built-in dataset name


def _typed(command: str, name: str, words: list[str]):
    """The value the CLI would give these words (None when it refuses them: the check reports that)."""
    try:
        return cli.parse_argv(command, [f"--{name}", *words])[name]
    except UserError:
        return None


def form_flags(command: str, form: dict[str, str], cwd: Path) -> tuple[list[str], list[Problem]]:
    """`--flag value ...` for every form field whose value differs from the command's default."""
    flags, out, problems = flags_of(command), [], []
    for name, text in form.items():
        if name not in flags or text is None or not str(text).strip():
            continue
        flag = flags[name]
        words = split_words(name, str(text)) if flag.is_list else [str(text).strip()]
        if name in PATH_FIELDS:
            try:
                words = [resolve_path(name, w, cwd) for w in words]
            except UserError as exc:
                problems.append(Problem(name, str(exc)))
                continue
        value = _typed(command, name, words)
        if value is not None and value == flag.default and name != "output_dir":
            continue
        out += [f"--{name}", *words]
    return out, problems


def build_command(command: str, form: dict[str, str], *, cwd: Path, fixed: tuple[str, ...] = (),
                  extra: str = "", required: bool = True) -> tuple[Command, list[Problem]]:
    """The command the form means, and what is wrong with it (an empty list: it will start).

    required=False leaves out the REQUIRED check (a preview while the form is being filled)."""
    flags, problems = form_flags(command, form, cwd)
    try:
        extra_words = shlex.split(extra or "")
    except ValueError as exc:  # an unclosed quote
        extra_words, problems = [], problems + [Problem("", f"other flags: {exc}")]
    cmd = Command(command, [*fixed, *flags, *extra_words])
    for name in REQUIRED.get(command, ()) if required else ():
        if name in form and not str(form[name] or "").strip() and f"--{name}" not in extra_words:
            problems.append(Problem(name, f"`lorakit {command}` needs --{name} (one value, or a Chinese and an "
                                          "English value separated by a comma)."))
    if not problems:
        problem = check(cmd, form)
        problems = [problem] if problem else []
    return cmd, problems


def check(cmd: Command, form: dict[str, str] | None = None) -> Problem | None:
    """Parse and validate the command exactly as `lorakit` would; the problem names the field it is about."""
    try:
        cli.build_args(cli.COMMANDS[cmd.command][1], cli.parse_argv(cmd.command, cmd.flags))
    except UserError as exc:
        return Problem(field_of(str(exc), form or {}), str(exc))
    return None


def field_of(message: str, form: dict[str, str]) -> str:
    """The form field a CLI message is about: the first --flag it names, if the form has that field."""
    if message.startswith("unknown flag"):  # a flag typed under "other flags"
        return ""
    for match in re.finditer(r"--([A-Za-z0-9_-]+)", message):
        name = match.group(1).replace("-", "_")
        name = ALIASES.get(name, name)
        if name in form:
            return name
    return ""
