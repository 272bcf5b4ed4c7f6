"""`lorakit export`: merge an adapter into its base, check the merge, write HF / GGUF / Ollama files, push.

The merge happens in float32 (base weights up-cast exactly, adapter weights as trained), then the
result is cast to the model's dtype. Before anything is written, the merged model is compared with
base+adapter on a few chat prompts: the largest logit difference and the greedy answers. The
float32 merge must match base+adapter to float32 rounding; the cast model must stay within its
dtype's tolerance. A miss is an error, because a merged model that answers differently from the
adapter it came from is the bug users report most.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi

from lorakit.args import ExportArgs, ModelArgs
from lorakit.checkpoint import ADAPTER_CONFIG
from lorakit.data.render import render_prompt, template_with_default_system
from lorakit.errors import UserError
from lorakit.gguf_writer import check_convertible, write_gguf
from lorakit.infer.engine import Engine, SamplingParams, end_of_turn_ids
from lorakit.loader import LoadedModel, find_adapter, open_model, saved_args, trained_on
from lorakit.model import DTYPES, resolve_model_path

# Questions the merge check renders with the chat template (short answers keep it fast).
VERIFY_QUESTIONS = ("Who are you?", "What is the capital of France?", "Write one sentence about the sea.")
VERIFY_NEW_TOKENS = 24
# Largest logit difference allowed, relative to the largest reference logit (at least 1.0).
# float32: reassociation only; half types: one rounding of every weight, summed over the layers.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 0.02, torch.bfloat16: 0.08}
HUB_SKIP = ["optimizer.pt", "rng_state.pt", "trainer_state.json", "*.tmp*"]


@dataclass
class MergeCheck:
    """How the merged model compares with base+adapter (float32) on the check prompts."""

    dtype: str
    prompts: int
    adapter_effect: float
    "Largest logit change the adapter makes over the base (shows the check is not vacuous)."
    fp32_diff: float
    "Largest logit difference, float32 merge vs base+adapter."
    dtype_diff: float
    "Largest logit difference, merged model in its final dtype vs base+adapter."
    fp32_tolerance: float
    dtype_tolerance: float
    fp32_greedy_same: int
    dtype_greedy_same: int

    @property
    def ok(self) -> bool:
        return (self.fp32_diff <= self.fp32_tolerance and self.fp32_greedy_same == self.prompts
                and self.dtype_diff <= self.dtype_tolerance)

    def lines(self) -> list[str]:
        """The report printed after the merge."""
        verdict = "OK" if self.ok else "MISMATCH"
        return [
            f"merge check ({self.prompts} prompts, greedy {VERIFY_NEW_TOKENS} tokens): {verdict}",
            f"  adapter changes the base logits by up to {self.adapter_effect:.4g}",
            f"  float32 merge vs base+adapter: max logit diff {self.fp32_diff:.3g} (tolerance "
            f"{self.fp32_tolerance:.3g}), greedy answers identical {self.fp32_greedy_same}/{self.prompts}",
            f"  {self.dtype} merged model vs base+adapter: max logit diff {self.dtype_diff:.3g} (tolerance "
            f"{self.dtype_tolerance:.3g}), greedy answers identical {self.dtype_greedy_same}/{self.prompts}",
        ]


@dataclass
class _Reference:
    logits: list[torch.Tensor]
    answers: list[list[int]]


def main(args: ExportArgs) -> int:
    """Run `lorakit export`: merge and check, then write the requested files."""
    if not args.adapter.adapters:
        raise UserError("lorakit export needs --adapters CHECKPOINT (a checkpoint-N folder or a run folder from sft).")
    ckpt = find_adapter(args.adapter.adapters[0])
    is_adapter = (ckpt / ADAPTER_CONFIG).is_file()
    wants_files = bool(args.to_gguf or args.to_ollama)
    if is_adapter and not (args.adapter.merge_lora or wants_files):
        if args.push_to_hub:
            return _push(ckpt, args, ignore=HUB_SKIP)
        raise UserError(f"{ckpt} holds a LoRA adapter: pass --merge_lora true to merge it into a full model "
                        f"(and --to_gguf f16 / --to_ollama true / --push_to_hub REPO for more).")
    out = Path(args.output_dir or f"{ckpt}-merged").expanduser().resolve()
    refuse_non_empty(out)  # before the merge: a taken folder should cost nothing
    if wants_files:  # before the merge: a model the GGUF writer cannot take costs seconds, not a merge
        check_gguf_source(ckpt, args.model, args.to_gguf or "f16")
    loaded = open_model(args.model, [str(ckpt)], system=args.adapter.system, torch_dtype="float32",
                        device=args.model.device, full_precision=True, command="export")
    system = loaded.system
    if is_adapter:
        model, tokenizer, check = merge_and_check(ckpt, args.model.torch_dtype, args.model.device, system, loaded=loaded)
    else:
        model, tokenizer, check = _load_full(ckpt, args.model.torch_dtype, loaded)
    save_merged(model, tokenizer, out, max_shard_size=args.max_shard_size,
                info={"checkpoint": str(ckpt), "system": system, "merge_check": asdict(check) if check else None})
    print(f"wrote {out}")
    del model
    gguf_path = None
    if args.to_gguf or args.to_ollama:
        outtype = args.to_gguf or "f16"
        gguf_path = out / f"{out.name}-{outtype}.gguf"
        summary = write_gguf(out, gguf_path, outtype=outtype, name=out.name)
        print(f"wrote {gguf_path} ({summary.architecture}, {outtype}, {summary.tensor_count} tensors, "
              f"{summary.file_bytes / 2**20:.1f} MiB)")
    if args.to_ollama:
        modelfile = write_modelfile(out, gguf_path, tokenizer, system)
        print(f"wrote {modelfile}; create the model with: ollama create {out.name.lower()} -f {modelfile}")
    if args.push_to_hub:
        _push(out, args, ignore=[])
    return 0


# ---------------------------------------------------------------- merge and check


def check_gguf_source(ckpt: Path, model_args: ModelArgs, outtype: str) -> None:
    """Refuse --to_gguf for a model the GGUF writer cannot convert, from config.json and tokenizer files only."""
    base = ckpt
    if (ckpt / ADAPTER_CONFIG).is_file():
        base = resolve_model_path(model_args.model or trained_on(ckpt), use_hf=model_args.use_hf,
                                  gguf_file=model_args.gguf_file)
    tokenizer_dir = ckpt if (ckpt / "tokenizer_config.json").is_file() else base
    check_convertible(json.loads((base / "config.json").read_text(encoding="utf-8")), base, outtype, tokenizer_dir)


def merge_and_check(ckpt: Path, torch_dtype: str, device: str | None, system: str | None,
                    loaded: LoadedModel | None = None):
    """Merge the adapter in float32, cast to the final dtype, and compare both with base+adapter.

    `loaded`: the checkpoint already opened in float32 (else it is opened here)."""
    if loaded is None:
        # a QLoRA adapter merges into the full-precision base: the merged model is an ordinary one
        loaded = open_model(ModelArgs(), [str(ckpt)], torch_dtype="float32", device=device, full_precision=True,
                            command="export")
    peft_model, tokenizer = loaded.model, loaded.tokenizer
    quant = saved_args(ckpt).quant
    if quant is not None:
        print(f"note: {ckpt.name} was trained on a {quant.quant_bits}-bit base (args.json); it is merged into the "
              f"full-precision base, which answers like the quantized one up to the quantization error.")
    dtype = final_dtype(torch_dtype, peft_model)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}], system=system) for q in VERIFY_QUESTIONS]
    with peft_model.disable_adapter():
        base_logits = prompt_logits(peft_model, prompts)
    reference = _Reference(prompt_logits(peft_model, prompts), greedy_answers(peft_model, tokenizer, prompts))
    merged = peft_model.merge_and_unload().eval()
    merged32 = _Reference(prompt_logits(merged, prompts), greedy_answers(merged, tokenizer, prompts))
    merged = merged.to(dtype)
    mergedd = merged32 if dtype == torch.float32 else _Reference(
        prompt_logits(merged, prompts), greedy_answers(merged, tokenizer, prompts))
    scale = max(1.0, max(float(x.abs().max()) for x in reference.logits))
    check = MergeCheck(
        dtype=str(dtype).removeprefix("torch."),
        prompts=len(prompts),
        adapter_effect=max_diff(base_logits, reference.logits),
        fp32_diff=max_diff(merged32.logits, reference.logits),
        dtype_diff=max_diff(mergedd.logits, reference.logits),
        fp32_tolerance=RELATIVE_TOLERANCE[torch.float32] * scale,
        dtype_tolerance=RELATIVE_TOLERANCE[dtype] * scale,
        fp32_greedy_same=sum(a == b for a, b in zip(merged32.answers, reference.answers)),
        dtype_greedy_same=sum(a == b for a, b in zip(mergedd.answers, reference.answers)),
    )
    print("\n".join(check.lines()))
    if not check.ok:
        raise UserError(f"the merged model of {ckpt} does not answer like base+adapter (see the merge check above); "
                        f"nothing was written. Re-run with --torch_dtype float32 to export an unrounded merge, and "
                        f"report the numbers if the float32 line is the one that failed.")
    return merged, tokenizer, check


def final_dtype(torch_dtype: str, model) -> torch.dtype:
    """--torch_dtype if given, else the dtype the base model was saved in (its config.json), else float32."""
    if torch_dtype and torch_dtype != "auto":
        return DTYPES[torch_dtype]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return saved_dtype(Path(base.name_or_path))


def saved_dtype(folder: Path) -> torch.dtype:
    """The dtype in a model folder's config.json (a loaded model's config says what it was loaded as)."""
    config = folder / "config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    return DTYPES.get(str(saved.get("dtype") or saved.get("torch_dtype") or "float32"), torch.float32)


def prompt_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits [T, V] of every prompt, each run alone (no padding to blur the comparison)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]


def greedy_answers(model, tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy reply token ids through lorakit's engine (reference decoder, so paths do not differ)."""
    engine = Engine(model, tokenizer, fast=False)
    params = SamplingParams(temperature=0.0, max_new_tokens=VERIFY_NEW_TOKENS)
    return [engine.generate([p], params)[0].token_ids for p in prompts]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference over matching tensors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _load_full(ckpt: Path, torch_dtype: str, loaded: LoadedModel):
    dtype = DTYPES[torch_dtype] if torch_dtype != "auto" else saved_dtype(ckpt)
    print(f"{ckpt} holds full weights: nothing to merge, exporting them as {str(dtype).removeprefix('torch.')}")
    return loaded.model.to(dtype), loaded.tokenizer, None


# ---------------------------------------------------------------- files


def save_merged(model, tokenizer, out: Path, *, max_shard_size: str, info: dict) -> Path:
    """A plain Hugging Face folder: sharded safetensors, config, generation_config, tokenizer + chat template."""
    refuse_non_empty(out)
    if info.get("system") is not None:
        tokenizer.chat_template = template_with_default_system(tokenizer.chat_template, info["system"])
    stops = sorted(end_of_turn_ids(tokenizer, model))
    # Plain transformers `generate` then stops at the end of the assistant's turn, as lorakit does.
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.dtype = next(model.parameters()).dtype
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "lorakit_export.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    match_permissions(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def refuse_non_empty(out: Path) -> None:
    """--output_dir must be new or empty: an export never mixes its files with others."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output_dir {out} exists and is not empty: remove it or pass another --output_dir.")


def match_permissions(folder: Path) -> None:
    """Give every file the mode of config.json: safetensors writes its files private (0600), the rest 0644."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


@dataclass
class ChatPieces:
    """The fixed text the chat template puts around each turn, found by rendering placeholder turns."""

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    default_system: str | None


_MARK = "\u2063{}\u2063"  # invisible separators around placeholder words; no template writes them


def chat_pieces(tokenizer) -> ChatPieces:
    """Split the tokenizer's chat template into per-role prefix/suffix text by rendering placeholder turns."""
    s, u, a, u2 = (_MARK.format(w) for w in ("SYS", "USR", "AST", "US2"))
    sys_turn, user_turn = {"role": "system", "content": s}, {"role": "user", "content": u}

    def render(messages, gen=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    full = render([sys_turn, user_turn, {"role": "assistant", "content": a}, {"role": "user", "content": u2}])
    sys_pre, sys_to_user, user_to_ast, ast_to_user, user2_suffix = re.split("\u2063(?:SYS|USR|AST|US2)\u2063", full)
    ast_suffix = render([sys_turn, user_turn, {"role": "assistant", "content": a}]).split(a)[-1]
    gen_prompt = render([sys_turn, user_turn], gen=True).split(u)[-1]
    user_suffix = render([sys_turn, user_turn]).split(u)[-1]
    pieces = ChatPieces(sys_pre, "", "", user_suffix, gen_prompt[len(user_suffix):], ast_suffix, None)
    pieces.user_prefix = ast_to_user[len(ast_suffix):]
    pieces.system_suffix = sys_to_user[:len(sys_to_user) - len(pieces.user_prefix)]
    consistent = (gen_prompt.startswith(user_suffix) and user_to_ast == gen_prompt and user2_suffix == user_suffix
                  and ast_to_user.startswith(ast_suffix) and sys_to_user.endswith(pieces.user_prefix))
    if not consistent:
        raise UserError("--to_ollama: the chat template does not wrap each turn in fixed text, so no Ollama "
                        "TEMPLATE can be derived from it; write the Modelfile's TEMPLATE by hand.")
    default = render([user_turn], gen=True)
    head = default.split(pieces.system_suffix + pieces.user_prefix + u)[0]
    if head.startswith(sys_pre) and head != default:
        pieces.default_system = head[len(sys_pre):] or None
    return pieces


def render_with_pieces(pieces: ChatPieces, messages: list[dict[str, str]]) -> str:
    """What the Ollama TEMPLATE written by `modelfile_text` produces for `messages` (generation prompt included)."""
    wrap = {"system": (pieces.system_prefix, pieces.system_suffix), "user": (pieces.user_prefix, pieces.user_suffix),
            "assistant": (pieces.assistant_prefix, pieces.assistant_suffix)}
    return "".join(wrap[m["role"]][0] + m["content"] + wrap[m["role"]][1] for m in messages) + pieces.assistant_prefix


def modelfile_text(gguf_name: str, pieces: ChatPieces, system: str | None, stops: list[str]) -> str:
    """An Ollama Modelfile: the GGUF, a TEMPLATE rendering turns like the chat template, SYSTEM and stop tokens."""
    def q(text: str) -> str:
        return text.replace('"""', '\\"\\"\\"')

    # No {{- trim markers: the template's own newlines after each turn must survive.
    body = ("{{ range .Messages }}"
            f'{{{{ if eq .Role "system" }}}}{q(pieces.system_prefix)}{{{{ .Content }}}}{q(pieces.system_suffix)}'
            f'{{{{ else if eq .Role "user" }}}}{q(pieces.user_prefix)}{{{{ .Content }}}}{q(pieces.user_suffix)}'
            f'{{{{ else if eq .Role "assistant" }}}}{q(pieces.assistant_prefix)}{{{{ .Content }}}}'
            f"{q(pieces.assistant_suffix)}"
            "{{ end }}{{ end }}" + q(pieces.assistant_prefix))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    system = system if system is not None else pieces.default_system
    if system:
        lines.append(f'SYSTEM """{q(system)}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(out: Path, gguf_path: Path, tokenizer, system: str | None) -> Path:
    """Write `out/Modelfile` next to the GGUF file."""
    pieces = chat_pieces(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in sorted(end_of_turn_ids(tokenizer))]
    path = out / "Modelfile"
    path.write_text(modelfile_text(gguf_path.name, pieces, system, stops))
    return path


def _push(folder: Path, args: ExportArgs, *, ignore: list[str]) -> int:
    """Upload `folder` to the hub repository --push_to_hub; offline or unauthorised is a clear error."""
    api = HfApi(token=args.hub_token)
    try:
        api.create_repo(args.push_to_hub, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=args.push_to_hub, ignore_patterns=ignore or None,
                                 commit_message="Upload from lorakit export")
    except Exception as exc:  # network, auth and offline-mode errors all mean: the upload did not happen
        raise UserError(f"--push_to_hub {args.push_to_hub}: the upload failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}). The files are in {folder}; check the "
                        f"network and your token (huggingface-cli login or --hub_token), then upload them with "
                        f"`huggingface-cli upload {args.push_to_hub} {folder}`.") from exc
    print(f"pushed {folder} to {getattr(info, 'commit_url', args.push_to_hub)}", file=sys.stderr)
    return 0
