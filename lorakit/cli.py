"""`lorakit COMMAND --flag value ...`: ms-swift flag spellings, dashes or underscores, --config YAML.

Flags come from the dataclass groups in `lorakit.args`; a command is one entry of COMMANDS.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from lorakit import args as A
from lorakit.errors import UserError
from lorakit.launch import relaunch, resolve_strategy

# command -> (module with `main(args) -> int`, its args dataclass, one-line help)
COMMANDS = {
    "sft": ("lorakit.train", A.SftArgs, "Fine-tune a model (LoRA or full) on your data."),
    "check-data": ("lorakit.check_data", A.CheckDataArgs, "Show exactly what sft would train on, without loading weights."),
    "infer": ("lorakit.infer.chat", A.InferArgs, "Chat with a base model or a checkpoint (REPL, --query, batch)."),
    "eval": ("lorakit.evaluate", A.EvalArgs, "Prove the identity was learned and nothing else was lost."),
    "quickstart": ("lorakit.quickstart", A.QuickstartArgs, "Give a model a new identity in one command, with proof."),
    "export": ("lorakit.export", A.ExportArgs, "Merge an adapter, write GGUF / Ollama files, push to the hub."),
    "deploy": ("lorakit.serve", A.DeployArgs, "Serve a model or checkpoint behind an OpenAI-compatible API."),
    "web-ui": ("lorakit.webui.app", A.WebUIArgs, "Train, chat, evaluate and export from a browser (drives these commands)."),
    "rlhf": ("lorakit.rlhf.command", A.RlhfArgs, "Preference training (DPO, ORPO, SimPO, KTO, CPO) on top of an SFT adapter."),
}
# commands that NPROC_PER_NODE=N re-launches through torchrun (lorakit.launch)
LAUNCHED = ("sft", "rlhf")
NOT_YET: dict[str, str] = {}
TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


@dataclasses.dataclass
class Flag:
    name: str                 # canonical flag name (field name)
    path: tuple[str, ...]     # attribute path inside the args dataclass, e.g. ("train", "learning_rate")
    kind: type                # bool, int, float, str
    is_list: bool
    help: str
    default: object


@functools.cache  # the source is read once per class: the web UI parses a form on every keystroke
def _field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (the string literal after each field)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = nxt.value.value
    return docs


def _unwrap(hint) -> tuple[type, bool]:
    """(scalar type, is_list) of a field type such as `list[str]` or `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _taken(f: dataclasses.Field, flags: dict) -> dict:
    """The flags of a group field the command takes (a subset when the field says so: args.only_flags)."""
    only = f.metadata.get("flags")
    return flags if only is None else {name: flags[name] for name in only if name in flags}


def collect_flags(cls, prefix: tuple[str, ...] = ()) -> dict[str, Flag]:
    """Flatten a (nested) args dataclass into {flag name: Flag}."""
    flags, hints, docs = {}, typing.get_type_hints(cls), _field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            flags.update(_taken(f, collect_flags(hint, prefix + (f.name,))))
            continue
        kind, is_list = _unwrap(hint)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flags[f.name] = Flag(f.name, prefix + (f.name,), kind, is_list, docs.get(f.name, ""), default)
    return flags


def _convert(flag: Flag, text: str):
    try:
        if flag.kind is bool:
            low = str(text).lower()
            if low in TRUE or low in FALSE:
                return low in TRUE
            raise ValueError
        if flag.kind is int:
            return int(float(text)) if "e" in str(text).lower() else int(text)
        return flag.kind(text)
    except (TypeError, ValueError):
        expect = "true or false" if flag.kind is bool else flag.kind.__name__
        raise UserError(f"--{flag.name}: expected {expect}, got {text!r}.") from None


def _unknown(name: str, flags: dict[str, Flag], command: str) -> UserError:
    close = difflib.get_close_matches(name, list(flags) + list(A.ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return UserError(f"unknown flag --{name} for `lorakit {command}`.{hint} See `lorakit {command} --help`.")


def parse_argv(command: str, argv: list[str]) -> dict[str, object]:
    """Command-line flags -> {flag name: value}; --config YAML fills in, the command line wins."""
    flags = collect_flags(COMMANDS[command][1])
    raw: dict[str, list[str] | None] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: every value follows a --flag.")
        name, _, inline = token[2:].partition("=")
        name = A.ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
            values.append(argv[i])
            i += 1
        raw[name] = values
    config = raw.pop("config", None)
    values: dict[str, object] = {}
    if config:
        values.update(load_config_file(config[0], flags, command))
    for name, vals in raw.items():
        if name not in flags:
            raise _unknown(name, flags, command)
        values[name] = _values(flags[name], vals)
    return values


def _values(flag: Flag, vals: list[str]):
    """Typed value of a flag from the words that followed it on the command line."""
    if flag.kind is bool and not vals:
        return True
    if not vals:
        raise UserError(f"--{flag.name} needs a value.")
    if flag.is_list:
        if flag.name in A.COMMA_LISTS:  # --target_modules q_proj,v_proj (the tutorials' spelling)
            vals = [part.strip() for v in vals for part in v.split(",") if part.strip()]
        return [_convert(flag, v) for v in vals]
    if len(vals) > 1:
        raise UserError(f"--{flag.name} takes one value, got {len(vals)}: {' '.join(vals)}")
    return _convert(flag, vals[0])


def _yaml_value(flag: Flag, value):
    """Typed value of a flag from a YAML scalar or list."""
    if value is None:
        return [] if flag.is_list else None
    if isinstance(value, list) and not flag.is_list:
        raise UserError(f"--{flag.name} takes one value, the config file gives a list: {value}")
    return _values(flag, [str(v) for v in value] if isinstance(value, list) else [str(value)])


def load_config_file(path: str, flags: dict[str, Flag], command: str) -> dict[str, object]:
    """Read --config FILE.yaml: any flag by name, nested or flat."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--config {path}: no such file: {file.resolve()}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {file.resolve()}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {file.resolve()}: expected a mapping of flag: value.")
    out = {}
    for key, value in data.items():
        name = A.ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in flags:
            raise _unknown(name, flags, command)
        out[name] = _yaml_value(flags[name], value)
    return out


def build_args(cls, values: dict[str, object], prefix: tuple[str, ...] = ()):
    """Construct the nested args dataclass from flat flag values (validation runs in __post_init__)."""
    kwargs, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build_args(hints[f.name], _taken(f, values), prefix + (f.name,))
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def print_notices(args) -> None:
    """Print each flag group's notices: flags accepted for compatibility that change nothing."""
    for f in dataclasses.fields(args):
        group = getattr(args, f.name)
        if dataclasses.is_dataclass(group) and hasattr(group, "notices"):
            for line in group.notices():
                print(line, file=sys.stderr)


def format_help(command: str) -> str:
    module, cls, summary = COMMANDS[command]
    lines = [f"usage: lorakit {command} [--flag value ...] [--config FILE.yaml]", "", summary, "",
             "Flags take dashes or underscores (--max-length / --max_length), --flag value or --flag=value;",
             "booleans accept true/false or stand bare.", ""]
    for flag in collect_flags(cls).values():
        kind = "true|false" if flag.kind is bool else flag.kind.__name__.upper() + (" ..." if flag.is_list else "")
        default = "" if flag.default in (None, [], "") else f" (default: {flag.default})"
        lines.append(f"  --{flag.name} {kind}\n      {flag.help}{default}")
    return "\n".join(lines)


def format_overview() -> str:
    lines = ["usage: lorakit COMMAND [--flag value ...]", "", "commands:"]
    lines += [f"  {name:<11} {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "`lorakit COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def launch(command: str, rest: list[str], args) -> None:
    """NPROC_PER_NODE=N: replace this process with torchrun running N of `lorakit COMMAND ...` (flags checked first)."""
    lora = getattr(args, "lora", None)
    resolve_strategy(deepspeed=args.dist.deepspeed, fsdp=args.dist.fsdp, train_type=lora.train_type if lora else "lora",
                     launched=True)
    relaunch(command, rest, timeout_s=args.dist.ddp_timeout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(format_overview())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in NOT_YET:
            raise UserError(f"`lorakit {command}` ({NOT_YET[command]}) is not built yet; "
                            f"see `lorakit --help` for what is.")
        if command not in COMMANDS:
            close = difflib.get_close_matches(command, list(COMMANDS), n=2)
            raise UserError(f"unknown command {command!r}." + (f" Did you mean {' or '.join(close)}?" if close else "")
                            + " See `lorakit --help`.")
        if "-h" in rest or "--help" in rest:
            print(format_help(command))
            return 0
        module, cls, _ = COMMANDS[command]
        args = build_args(cls, parse_argv(command, rest))
        if command in LAUNCHED and os.environ.get("NPROC_PER_NODE"):
            launch(command, rest, args)  # returns only when already under torchrun
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every process
            print_notices(args)
        return int(importlib.import_module(module).main(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorakit ... | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
