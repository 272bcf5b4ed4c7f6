"""`lorakit infer`: chat with a base model or a checkpoint.

Three modes over one loaded session: the interactive REPL (streamed, multi-turn), `--query`
(one answer, then exit), and batch (`--val_dataset` -> `--result_path` JSONL). Every prompt is
made by `lorakit.data.render.render_prompt`, the function training renders with.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm

from lorakit.args import GenerationArgs, InferArgs
from lorakit.data.loading import load_conversations
from lorakit.data.render import render_prompt
from lorakit.errors import UserError
from lorakit.infer.engine import Engine, Generation, SamplingParams
from lorakit.infer.vllm_backend import run_vllm
from lorakit.loader import base_is_quantized, open_model
from lorakit.model import pick_device

HELP = ("Commands: /clear forgets the conversation, /system TEXT sets the system prompt, /exit or Ctrl-D leaves.\n"
        "Ctrl-C stops an answer. End a line with \\ to continue it on the next line, or put text between \"\"\" "
        "lines for several lines.")


@dataclass
class ChatSession:
    """A loaded model ready to answer: the engine, the system prompt, where it came from."""

    engine: Engine
    system: str | None
    label: str
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)


def main(args: InferArgs) -> int:
    """Entry point of `lorakit infer`."""
    if args.infer_backend == "vllm":
        return run_vllm(args)
    session = load_session(args)
    for note in session.notes:
        print(f"note: {note}", file=sys.stderr)
    params, note = sampling_params(args.generation, session.engine.model.generation_config)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.val_dataset:
        return run_batch(session, args, params)
    if args.query is not None:
        answer(session, [{"role": "user", "content": args.query}], params, stream=args.generation.stream,
               out=sys.stdout)
        return 0
    return run_repl(session, params, stream=args.generation.stream)


def sampling_params(g: GenerationArgs, config) -> tuple[SamplingParams, str | None]:
    """The flags, with those left empty taken from the model's generation config (as transformers and vLLM
    do); returns the parameters and a line naming what came from the config (None if nothing did)."""
    sampling = bool(getattr(config, "do_sample", False))
    defaults = dict(temperature=(getattr(config, "temperature", None) or 1.0) if sampling else 0.0,
                    top_p=(getattr(config, "top_p", None) or 1.0) if sampling else 1.0,
                    top_k=(getattr(config, "top_k", None) or 0) if sampling else 0,
                    repetition_penalty=getattr(config, "repetition_penalty", None) or 1.0)
    chosen = {name: getattr(g, name) if getattr(g, name) is not None else default for name, default in defaults.items()}
    from_config = {name: value for name, value in chosen.items() if getattr(g, name) is None
                   and value != {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}[name]}
    note = None
    if from_config:
        note = ("from the model's generation_config.json: " + ", ".join(f"{k} {v:g}" for k, v in from_config.items())
                + " (set --temperature 0 for exactly reproducible greedy answers)")
    return SamplingParams(**chosen, max_new_tokens=g.max_new_tokens, seed=g.seed), note


# ---------------------------------------------------------------- loading


def load_session(args: InferArgs) -> ChatSession:
    """Load the base model (--model) or a checkpoint (--adapters, optionally over --model)."""
    device = pick_device(args.model.device)
    # On a GPU the fast decoder needs plain weights: merge in memory (the files are untouched). Not over a base
    # quantized as trained (QLoRA): merging needs the full-precision base, the memory the user saved.
    quantized = base_is_quantized(args.adapter.adapters, args.base_quant)
    merge = bool(args.adapter.adapters) and (args.adapter.merge_lora or (device.type == "cuda" and not quantized))
    loaded = open_model(args.model, args.adapter.adapters, system=args.adapter.system, merge_lora=merge,
                        device=device, base_quant=args.base_quant, command="infer")
    notes = list(loaded.notes)
    if merge and not args.adapter.merge_lora:
        notes.append("merged the adapter into the weights in memory for the fast GPU decoder.")
    engine = Engine(loaded.model, loaded.tokenizer)
    if engine.device.type == "cuda" and not engine.uses_fast_path:
        notes.append(f"the fast GPU decoder is off ({engine.fast_note}); answers are slower.")
    return ChatSession(engine, loaded.system, loaded.label, loaded.checkpoint, notes)


# ---------------------------------------------------------------- answering


def fit_prompt(session: ChatSession, messages: list[dict], params: SamplingParams,
               warn: Callable[[str], None]) -> tuple[list[int], list[dict]]:
    """Render `messages`; if too long for the context, drop the oldest turns, then cut the start."""
    engine = session.engine
    allowed = engine.context - min(params.max_new_tokens, engine.context // 2)
    prompt = render_prompt(engine.tokenizer, messages, system=session.system)
    dropped = 0
    while len(prompt) > allowed and len(messages) > 2:
        messages = messages[2:] if messages[0]["role"] != "system" else messages[:1] + messages[3:]
        prompt = render_prompt(engine.tokenizer, messages, system=session.system)
        dropped += 1
    if dropped:
        warn(f"the conversation was too long for the model's context ({engine.context} tokens): "
             f"left out its {dropped} oldest exchange(s).")
    if len(prompt) > allowed:
        warn(f"the prompt has {len(prompt)} tokens, more than the {allowed} that fit the model's context "
             f"({engine.context}) with room for the answer: kept its last {allowed} tokens.")
        prompt = prompt[-allowed:]
    return prompt, messages


def _stderr(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def answer(session: ChatSession, messages: list[dict], params: SamplingParams, *, stream: bool,
           out: TextIO) -> tuple[str, Generation | None]:
    """Print the model's reply to `messages` (streamed or whole); Ctrl-C stops it, keeping what came."""
    prompt, _ = fit_prompt(session, messages, params, _stderr)
    engine = session.engine
    pieces: list[str] = []
    try:
        if stream:
            for piece in engine.stream(prompt, params):
                pieces.append(piece)
                out.write(piece)
                out.flush()
            generation = engine.last_generation
        else:
            generation = engine.generate([prompt], params)[0]
            pieces.append(generation.text)
            out.write(generation.text)
    except KeyboardInterrupt:
        out.write("\n[stopped]\n")
        out.flush()
        return "".join(pieces), None
    if generation.finish_reason == "length":
        out.write(f"\n[cut: reached --max_new_tokens {params.max_new_tokens}]")
    out.write("\n")
    out.flush()
    return generation.text, generation


# ---------------------------------------------------------------- the REPL


def read_message(read: Callable[[str], str]) -> str:
    """One user message: a line; a line ending in '\\' continues; a line starting with \"\"\" runs
    to the line that ends with \"\"\"."""
    line = read(">>> ")
    if line.lstrip().startswith('"""'):
        text = line.lstrip()[3:]
        lines = []
        while not text.rstrip().endswith('"""'):
            lines.append(text)
            text = read("... ")
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    return "\n".join(lines + [line])


def run_repl(session: ChatSession, params: SamplingParams, *, stream: bool, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout) -> int:
    """Chat until /exit or Ctrl-D; history is kept across turns."""
    if read is input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    out.write(f"lorakit infer: {session.label}. {HELP}\n")
    history: list[dict] = []
    system = session.system
    while True:
        try:
            text = read_message(read)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C) type /exit or press Ctrl-D to leave.\n")
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/clear":
            history = []
            out.write("[history cleared]\n")
            continue
        if command == "/system" or command.startswith("/system "):
            system = command[len("/system"):].strip() or session.system
            history = []
            out.write(f"[system prompt set: {system!r}; history cleared]\n" if system else "[default system prompt]\n")
            continue
        if command.startswith("/"):
            out.write(f"[unknown command {command.split()[0]}] {HELP}\n")
            continue
        messages = history + [{"role": "user", "content": text}]
        turn = ChatSession(session.engine, system, session.label, session.checkpoint)
        try:
            reply, _ = answer(turn, messages, params, stream=stream, out=out)
        except KeyboardInterrupt:  # Ctrl-C before the first token: forget this question
            out.write("\n[stopped]\n")
            continue
        history = messages + [{"role": "assistant", "content": reply}]


# ---------------------------------------------------------------- batch


def default_result_path(checkpoint: Path | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (checkpoint or Path.cwd()) / "infer_result" / f"{stamp}.jsonl"


def run_batch(session: ChatSession, args: InferArgs, params: SamplingParams) -> int:
    """Answer every row of --val_dataset; one JSON line per row in --result_path."""
    parts = load_conversations(args.val_dataset, seed=args.generation.seed, use_hf=args.model.use_hf,
                               require_answer=False, log=lambda msg: print(msg, file=sys.stderr))
    rows = []
    for part in parts:
        for conv in part.conversations:
            messages = list(conv.messages)
            reference = messages.pop()["content"] if messages[-1]["role"] == "assistant" else None
            if not any(m["role"] == "user" for m in messages):
                raise UserError(f"{conv.source}: the row has no user message to answer.")
            rows.append((conv.source, messages, reference))
    path = Path(args.result_path).expanduser() if args.result_path else default_result_path(session.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = session.engine
    engine.max_batch_size = args.max_batch_size
    group = args.max_batch_size * 8  # several batches per call, so similar lengths batch together
    with path.open("w", encoding="utf-8") as f, tqdm(total=len(rows), desc="infer", unit="row", file=sys.stderr) as bar:
        for start in range(0, len(rows), group):
            chunk = rows[start:start + group]
            prompts = [fit_prompt(session, messages, params, _stderr)[0] for _, messages, _ in chunk]
            for (source, messages, reference), gen in zip(chunk, engine.generate(prompts, params)):
                record = dict(messages=messages, response=gen.text, reference=reference,
                              finish_reason=gen.finish_reason, prompt_tokens=gen.prompt_tokens,
                              completion_tokens=gen.completion_tokens, source=source)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            bar.update(len(chunk))
    print(f"wrote {len(rows)} results to {path}", file=sys.stderr)
    return 0
