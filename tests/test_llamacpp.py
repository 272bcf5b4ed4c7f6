"""Optional: lorakit's GGUF exports run in real llama.cpp and answer like the merged model.

llama.cpp comes prebuilt with the npm package node-llama-cpp; these tests run when
$LORAKIT_LLAMACPP_DIR names a folder holding node_modules/node-llama-cpp (and `node` is on PATH):
    mkdir -p /tmp/llamacpp && cd /tmp/llamacpp && npm init -y && npm install node-llama-cpp
    LORAKIT_LLAMACPP_DIR=/tmp/llamacpp python -m pytest tests/test_llamacpp.py
bench/llamacpp_check.py does the same comparison for every GGUF type and prints a table.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from test_export import make_lora_checkpoint

sys.path.insert(0, str(ROOT / "bench"))
import llamacpp_check  # noqa: E402


@pytest.fixture(scope="module")
def llamacpp_dir() -> Path:
    found = llamacpp_check.find_llamacpp(os.environ.get("LORAKIT_LLAMACPP_DIR"))
    if found is None:
        pytest.skip("llama.cpp not available: set LORAKIT_LLAMACPP_DIR to a folder where `npm install "
                    "node-llama-cpp` ran (see this file's docstring)")
    if shutil.which("node") is None:
        pytest.skip("llama.cpp not available: `node` is not on PATH (node-llama-cpp needs Node.js 20+)")
    return found


def export_ggufs(base: Path, work: Path, outtypes: tuple[str, ...], **lora) -> tuple[Path, dict[str, Path]]:
    """A random LoRA on `base`, merged and exported once per GGUF type with the CLI; (merged folder, ggufs)."""
    ckpt = make_lora_checkpoint(base, work / "run" / "checkpoint-1", **lora)
    ggufs = {}
    for outtype in outtypes:
        out = work / f"merged-{outtype}"
        proc = run_cli("export", "--adapters", str(ckpt), "--merge_lora", "true", "--to_gguf", outtype,
                       "--output_dir", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        ggufs[outtype] = out / f"{out.name}-{outtype}.gguf"
    return work / f"merged-{outtypes[0]}", ggufs


def assert_runs_like_transformers(rows: list, *, exact: set[str]) -> None:
    """Every GGUF: same tokenization, chat template and stopping as transformers; `exact` types: same tokens."""
    for row in rows:
        detail = f"{row.model} {row.outtype}: {row.first_difference}; {row.notes}"
        assert row.tokenization_ok and row.template_ok and row.stops_ok, detail
        assert row.tokens_compared > 0
        if row.outtype in exact:
            assert row.match and row.same_as_gguf_weights == row.prompts, detail


def test_tiny_qwen2_ggufs_run_in_llama_cpp_like_transformers(llamacpp_dir, tiny_qwen2_dir, tmp_path):
    merged, ggufs = export_ggufs(tiny_qwen2_dir, tmp_path, ("f16", "q8_0"))
    rows = llamacpp_check.check_export("tiny-qwen2", merged, ggufs, llamacpp_dir=llamacpp_dir, max_new_tokens=32,
                                       scratch=tmp_path)
    # q8_0 also rounds activations to 8 bits in llama.cpp: near-tied logits of a random model may flip.
    assert_runs_like_transformers(rows, exact={"f16"})


@pytest.mark.slow
def test_smollm2_f16_gguf_answers_in_llama_cpp_exactly_like_the_merged_model(llamacpp_dir, smollm2_dir, tmp_path):
    merged, ggufs = export_ggufs(smollm2_dir, tmp_path, ("f16",), targets=["q_proj", "k_proj", "v_proj"], rank=4)
    rows = llamacpp_check.check_export("smollm2", merged, ggufs, llamacpp_dir=llamacpp_dir, max_new_tokens=32,
                                       scratch=tmp_path)
    assert_runs_like_transformers(rows, exact={"f16"})
