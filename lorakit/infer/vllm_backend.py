"""`lorakit infer --infer_backend vllm`: the same --query and batch modes through vLLM, if installed.

vLLM is an optional, GPU-only dependency; without it the user gets an error that says how to
install it (lorakit's own engine, --infer_backend pt, is the default and needs nothing more).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorakit.args import InferArgs
from lorakit.data.loading import load_conversations
from lorakit.data.render import render_prompt
from lorakit.errors import UserError
from lorakit.loader import open_tokenizer

INSTALL_HINT = ("--infer_backend vllm needs the vllm package, which is not installed here. Install it on a Linux "
                "machine with an NVIDIA GPU (`pip install vllm`), or use --infer_backend pt, lorakit's own engine "
                "(the default).")


def run_vllm(args: InferArgs) -> int:
    """Answer --query or every --val_dataset row with vLLM (the LoRA adapter applied per request)."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if args.query is None and not args.val_dataset:
        raise UserError("--infer_backend vllm answers --query or --val_dataset; the interactive chat uses "
                        "--infer_backend pt.")
    opened = open_tokenizer(args.model, args.adapter.adapters, system=args.adapter.system, command="infer")
    ckpt, base, tokenizer, system = opened.checkpoint, opened.base_path, opened.tokenizer, opened.system
    llm = vllm.LLM(model=str(base), enable_lora=ckpt is not None, seed=args.generation.seed,
                   max_model_len=args.vllm_max_model_len, dtype=args.model.torch_dtype)
    lora = LoRARequest("adapter", 1, str(ckpt)) if ckpt else None
    g = args.generation
    params = llm.get_default_sampling_params()  # the model's generation_config.json, as vLLM reads it
    for name in ("temperature", "top_p", "repetition_penalty"):
        if getattr(g, name) is not None:
            setattr(params, name, getattr(g, name))
    if g.top_k is not None:
        params.top_k = g.top_k or -1
    params.max_tokens, params.seed = g.max_new_tokens, g.seed
    if args.query is not None:
        rows = [([{"role": "user", "content": args.query}], None)]
    else:
        parts = load_conversations(args.val_dataset, seed=g.seed, use_hf=args.model.use_hf, require_answer=False)
        rows = [(c.messages[:-1], c.messages[-1]["content"]) if c.messages[-1]["role"] == "assistant"
                else (c.messages, None) for part in parts for c in part.conversations]
    prompts = [{"prompt_token_ids": render_prompt(tokenizer, m, system=system)} for m, _ in rows]
    outputs = llm.generate(prompts, params, lora_request=lora)
    if args.query is not None:
        print(outputs[0].outputs[0].text)
        return 0
    path = Path(args.result_path or "infer_result.jsonl")
    with path.open("w", encoding="utf-8") as f:
        for (messages, reference), out in zip(rows, outputs):
            f.write(json.dumps(dict(messages=messages, response=out.outputs[0].text, reference=reference,
                                    prompt_tokens=len(out.prompt_token_ids),
                                    completion_tokens=len(out.outputs[0].token_ids)), ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} results to {path}", file=sys.stderr)
    return 0
