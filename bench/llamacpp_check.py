"""Do lorakit's GGUF exports run in real llama.cpp, and answer like the merged Hugging Face model?

llama.cpp comes prebuilt through the npm package node-llama-cpp (no compiler needed):
    mkdir -p /tmp/llamacpp && cd /tmp/llamacpp && npm init -y && npm install node-llama-cpp
    LORAKIT_LLAMACPP_DIR=/tmp/llamacpp python bench/llamacpp_check.py

For each model (the real SmolLM2-135M-Instruct, llama architecture; a tiny random Qwen2 with the real
Qwen2.5 tokenizer, qwen2 architecture) it trains a LoRA adapter for a few steps with `lorakit sft`,
exports it with `lorakit export --merge_lora true --to_gguf TYPE` (f16 also `--to_ollama`), loads each
GGUF in llama.cpp (bench/llamacpp_generate.mjs) and checks, on chat prompts rendered by the chat template:
- llama.cpp tokenizes the chat-formatted text to the Hugging Face tokenizer's ids (special tokens too);
- the chat template stored in the GGUF renders the same prompt ids (node-llama-cpp's Jinja renderer);
- the end-of-turn ids are end-of-generation tokens for llama.cpp, and greedy generation stops on them;
- greedy (temperature 0) token ids equal the merged float32 model's (`transformers` generate), and
  equal those of `transformers` running the GGUF's own (rounded) weights. At the first difference it
  prints both sides' margins: a flip between two near-equal logits is rounding, not a writer bug.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MJS = Path(__file__).with_name("llamacpp_generate.mjs")
OUTTYPES = ("f16", "q8_0", "bf16")
CONVERSATIONS = (
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Write a short paragraph about the sea."}],
    [{"role": "user", "content": "Explain step by step how a rainbow forms."}],
    [{"role": "system", "content": "You are terse. Answer in one line."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name 3 primes above 1000, e.g. 1009;  résumé \u2192 naïve?\n\tThanks 😀"}],
)

# Plain texts llama.cpp must tokenize exactly as the Hugging Face tokenizer does (special tokens parsed).
TEXTS = (
    "Numbers 12345, 3.14159 and 1,000,000; émigré naïve café",
    "  two leading spaces\n\n\nthree newlines\ttab \t mixed  \n",
    "don't I'll WE'RE they've",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 and arrows → ← ⇒",
    "code: def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"a\": 1}</tool_call><|endoftext|>",
)


@dataclass
class Case:
    """One chat prompt: the messages, the text the chat template renders, and the tokenizer's ids of it."""

    messages: list[dict[str, str]]
    text: str
    prompt_ids: list[int]


@dataclass
class Row:
    """The comparison of one GGUF file with the merged model it came from."""

    model: str
    outtype: str
    tokens_compared: int = 0
    identical: int = 0
    prompts: int = 0
    first_difference: str = "-"
    same_as_gguf_weights: int = 0
    tokenization_ok: bool = False
    template_ok: bool = False
    stops_ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def match(self) -> bool:
        return self.identical == self.prompts > 0


def find_llamacpp(folder: str | os.PathLike | None) -> Path | None:
    """The folder holding node_modules/node-llama-cpp, if `folder` is one."""
    if not folder:
        return None
    folder = Path(folder).expanduser()
    return folder if (folder / "node_modules" / "node-llama-cpp" / "package.json").is_file() else None


def run_llamacpp(gguf: Path, cases: list[Case], *, llamacpp_dir: Path, max_new_tokens: int,
                 check_ids: list[int]) -> dict:
    """Run bench/llamacpp_generate.mjs on `gguf`: llama.cpp's metadata, tokenization and greedy tokens per case."""
    request = {"model": str(gguf), "max_new_tokens": max_new_tokens, "check_ids": check_ids,
               "context_size": 1024, "texts": list(TEXTS),
               "cases": [{"text": c.text, "messages": c.messages, "prompt_ids": c.prompt_ids} for c in cases]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(request, handle, ensure_ascii=False)
    try:
        proc = subprocess.run(["node", str(MJS), handle.name], cwd=llamacpp_dir, capture_output=True, text=True,
                              timeout=600)
    finally:
        os.unlink(handle.name)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp could not run {gguf}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_cases(tokenizer) -> list[Case]:
    """The check conversations rendered with the tokenizer's chat template (generation prompt added)."""
    from lorakit.data.render import render_prompt

    return [Case(m, tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                 render_prompt(tokenizer, m)) for m in CONVERSATIONS]


def greedy(model, prompt_ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy decoding; the reply ends with its stop token when one came."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stops, pad_token_id=stops[0])
    return out[0, len(prompt_ids):].tolist()


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts at the shorter length); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def explain(model, case: Case, ref: list[int], got: list[int], top2: list, index: int) -> str:
    """Both sides' margins at the first difference: transformers' logit gap and llama.cpp's top-2 probabilities."""
    if index >= min(len(ref), len(got)):
        return f"@{index}: one side stopped (hf {len(ref)} tokens, llama.cpp {len(got)})"
    with torch.no_grad():
        logits = model(torch.tensor([case.prompt_ids + ref[:index]])).logits[0, -1].float()
    gap = float(logits[ref[index]] - logits[got[index]])
    _, p1, second, p2 = top2[index]
    llama_gap = math.log(p1 / p2) if p2 else math.inf  # log p1/p2 is llama.cpp's logit gap between its top two
    return (f"@{index}: hf {ref[index]} vs llama.cpp {got[index]} (its 2nd: {second}); logit gap between them: "
            f"hf {gap:.3g}, llama.cpp {llama_gap:.3g}")


def compare(row: Row, result: dict, cases: list[Case], text_ids: list[list[int]], refs: list[list[int]],
            gguf_refs: list[list[int]], model, stops: list[int]) -> Row:
    """Fill `row` from llama.cpp's output against the float32 references and the GGUF-weights references."""
    info = result["info"]
    row.prompts = len(cases)
    row.tokenization_ok = (all(out["tokenized"] == c.prompt_ids for out, c in zip(result["cases"], cases))
                           and info["texts_tokenized"] == text_ids)
    row.template_ok = all(out["template_ids"] == c.prompt_ids for out, c in zip(result["cases"], cases))
    eog_ok = all(info["eog"][str(i)] for i in stops)
    stopped = [out["stopped_on_eog"] == (bool(ref) and ref[-1] in stops) for out, ref in zip(result["cases"], refs)]
    row.stops_ok = eog_ok and all(stopped)
    for k, (out, case, ref, gref) in enumerate(zip(result["cases"], cases, refs, gguf_refs)):
        got = out["generated"]
        row.tokens_compared += min(len(ref), len(got))
        row.same_as_gguf_weights += got == gref
        index = first_difference(ref, got)
        if index is None:
            row.identical += 1
        elif row.first_difference == "-":
            row.first_difference = f"prompt {k} " + explain(model, case, ref, got, out["top2"], index)
        if not row.tokenization_ok and out["tokenized"] != case.prompt_ids:
            row.notes.append(f"prompt {k} tokenized {out['tokenized'][:40]} vs hf {case.prompt_ids[:40]}")
    for text, ids, got in zip(TEXTS, text_ids, info["texts_tokenized"]):
        if got != ids:
            row.notes.append(f"{text!r} tokenized {got} vs hf {ids}")
    if info["warnings"]:
        row.notes.append(f"llama.cpp warnings: {info['warnings']}")
    return row


def load_gguf_in_transformers(gguf: Path, scratch: Path):
    """transformers running the GGUF's own weights (rounded to its type), loaded from a folder holding only it."""
    from transformers import AutoModelForCausalLM

    folder = scratch / f"only-{gguf.stem}"
    folder.mkdir(exist_ok=True)
    if not (folder / gguf.name).exists():
        (folder / gguf.name).symlink_to(gguf)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32).eval()


def check_export(name: str, merged: Path, ggufs: dict[str, Path], *, llamacpp_dir: Path, max_new_tokens: int,
                 scratch: Path) -> list[Row]:
    """Compare every GGUF of one merged folder with it in llama.cpp; one row per GGUF type."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.infer.engine import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    stops = sorted(end_of_turn_ids(tokenizer, model))
    cases = render_cases(tokenizer)
    refs = [greedy(model, c.prompt_ids, stops, max_new_tokens) for c in cases]
    text_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    check_ids = sorted(set(stops) | {i for i in (tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None})
    rows = []
    for outtype, gguf in ggufs.items():
        gguf_model = load_gguf_in_transformers(gguf, scratch)
        gguf_refs = [greedy(gguf_model, c.prompt_ids, stops, max_new_tokens) for c in cases]
        del gguf_model
        result = run_llamacpp(gguf, cases, llamacpp_dir=llamacpp_dir, max_new_tokens=max_new_tokens,
                              check_ids=check_ids)
        row = compare(Row(name, outtype), result, cases, text_ids, refs, gguf_refs, model, stops)
        info = result["info"]
        if info["chat_template"] != tokenizer.chat_template:
            row.template_ok = False
            row.notes.append("the GGUF's tokenizer.chat_template differs from the tokenizer's")
        row.notes.append(f"llama.cpp: arch {info['architecture']}, pre {info['pre_tokenizer']}, bos {info['bos']}, "
                         f"eos {info['eos']}, eot {info['eot']}, eog {info['eog']}, "
                         f"chat wrapper {info['default_chat_wrapper']}; reply 0: {result['cases'][0]['text']!r}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- building the exports


def lorakit(*args: str) -> None:
    """Run the lorakit CLI as a user would; a failure stops the check with its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lorakit {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def build_tiny_qwen2(folder: Path) -> Path:
    """A random tiny Qwen2 (tests/conftest.py's settings) saved with the real Qwen2.5 tokenizer."""
    import shutil

    from transformers import AutoModelForCausalLM, Qwen2Config

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for f in (ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer").glob("*.json"):
        shutil.copy(f, folder / f.name)
    return folder


def train_and_export(name: str, base: Path | None, work: Path, outtypes: tuple[str, ...]) -> tuple[Path, dict]:
    """`lorakit sft` for 4 steps on the self-cognition data, then one `lorakit export` per GGUF type."""
    run = work / f"{name}-sft"
    if not run.exists():
        model = ["--model", str(base)] if base else []
        lorakit("sft", *model, "--dataset", "self-cognition#16", "--max_steps", "4", "--model_name", "Lumen",
                "--model_author", "Acme", "--learning_rate", "1e-3", "--output_dir", str(run), "--report_to", "none")
    (checkpoint,) = sorted(run.glob("v*-*/checkpoint-*"))
    ggufs, merged = {}, None
    for outtype in outtypes:
        out = work / f"{name}-{outtype}"
        if not out.exists():
            ollama = ["--to_ollama", "true"] if outtype == "f16" else []
            lorakit("export", "--adapters", str(checkpoint), "--merge_lora", "true", "--to_gguf", outtype,
                    "--output_dir", str(out), *ollama)
        ggufs[outtype] = out / f"{out.name}-{outtype}.gguf"
        merged = merged or out
    return merged, ggufs


def table(rows: list[Row]) -> str:
    """A markdown table of the rows."""
    head = ("model", "type", "tokens compared", "match (vs fp32 HF)", "same as HF on GGUF weights",
            "llama.cpp tokenization", "GGUF chat template", "stops at end of turn", "first difference")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (r.model, r.outtype, str(r.tokens_compared), f"{'yes' if r.match else 'no'} ({r.identical}/{r.prompts})",
                 f"{r.same_as_gguf_weights}/{r.prompts}", "same ids" if r.tokenization_ok else "DIFFERENT",
                 "same ids" if r.template_ok else "DIFFERENT", "yes" if r.stops_ok else "NO", r.first_difference)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp_dir", default=os.environ.get("LORAKIT_LLAMACPP_DIR"),
                        help="folder with node_modules/node-llama-cpp (default $LORAKIT_LLAMACPP_DIR)")
    parser.add_argument("--work", default=None, help="where runs and exports go (reused when present)")
    parser.add_argument("--models", default="smollm2,tiny-qwen2")
    parser.add_argument("--types", default=",".join(OUTTYPES))
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    llamacpp_dir = find_llamacpp(args.llamacpp_dir)
    if llamacpp_dir is None:
        print("no node_modules/node-llama-cpp under --llamacpp_dir / $LORAKIT_LLAMACPP_DIR; install it with:\n"
              "  mkdir -p /tmp/llamacpp && cd /tmp/llamacpp && npm init -y && npm install node-llama-cpp",
              file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="llamacpp-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    outtypes = tuple(args.types.split(","))
    rows = []
    for name in args.models.split(","):
        base = build_tiny_qwen2(work / "tiny-qwen2-base") if name == "tiny-qwen2" else None
        merged, ggufs = train_and_export(name, base, work, outtypes)
        rows += check_export(name, merged, ggufs, llamacpp_dir=llamacpp_dir, max_new_tokens=args.max_new_tokens,
                             scratch=work)
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"  {r.model} {r.outtype}: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ | {"match": r.match} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
