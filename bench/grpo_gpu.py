"""One GRPO step, lorakit vs TRL's GRPOTrainer + PEFT, in the same run: time per step and its split.

Qwen2.5-7B architecture with random bf16 weights (saved once as safetensors with the Qwen2.5 tokenizer),
LoRA r16 (alpha 32, dropout 0) on all linear layers, 8 prompts x 8 generations x 512 completion tokens
per optimizer step (--per_device_train_batch_size 8 x --gradient_accumulation_steps 8 completions), a
length reward, TRL's sampling defaults (temperature 1, no top-k/top-p) and beta 0 (TRL 1.16's default;
a second lorakit row with ms-swift's beta 0.04 pays the reference pass). A random model rarely emits
an end token, so nearly every completion runs the full 512 tokens.

lorakit runs `lorakit rlhf --rlhf_type grpo` itself (a subprocess, as a user would) and reads the step
times and the rollout / reference / update split from its logging.jsonl, and which decoder served the
rollouts from its stderr. TRL: GRPOTrainer(peft_config=LoraConfig(...)), gradient checkpointing, no vLLM
(the issue's reference: 31 s per step after the first, 59.5 s first, 36.8 GiB on an H200, 2026-12-02).

    PYTHONUNBUFFERED=1 python bench/grpo_gpu.py --out /tmp/grpo-gpu [--steps 3] [--json grpo.json]
    python bench/grpo_gpu.py --smoke        # CPU, tiny model: a dry run of this script's logic
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from qwen_arch import QWEN25_7B, TINY, build_random_qwen2  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
TRL_REFERENCE = {"step_s": 31.0, "first_step_s": 59.5, "peak_gib": 36.8}
REWARD = '''
def length_reward(completions, **kwargs):
    return [min(len(c), 2000) / 2000 for c in completions]
'''


def build_model(folder: Path, arch: dict, device: str) -> None:
    """Random-weight Qwen2 saved as safetensors with the tokenizer (kept when already there)."""
    if (folder / "config.json").is_file():
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_random_qwen2(arch, dtype, device)
    model.save_pretrained(folder, max_shard_size="5GB")
    for f in TOKENIZER.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, folder / f.name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def write_prompts(path: Path, n: int, words: int) -> list[str]:
    rng = random.Random(0)
    vocab = ("river stone garden music number city learn write read small large quick slow bright dark open "
             "close start finish model data token answer question light").split()
    prompts = [" ".join(rng.choice(vocab) for _ in range(words)) + ". Continue the story." for _ in range(n)]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


def run_lorakit(out: Path, model: Path, data: Path, plugin: Path, cfg: dict, beta: float, device: str) -> dict:
    """`lorakit rlhf --rlhf_type grpo` for cfg['steps'] steps; per-step seconds and split from logging.jsonl."""
    runs = out / f"lorakit-beta{beta:g}"
    shutil.rmtree(runs, ignore_errors=True)
    command = [sys.executable, "-m", "lorakit", "rlhf", "--rlhf_type", "grpo", "--model", str(model),
               "--dataset", str(data), "--train_type", "lora", "--lora_rank", "16", "--lora_alpha", "32",
               "--lora_dropout", "0", "--num_generations", str(cfg["gens"]),
               "--max_completion_length", str(cfg["completion"]), "--per_device_train_batch_size", str(cfg["batch"]),
               "--gradient_accumulation_steps", str(cfg["accum"]), "--max_steps", str(cfg["steps"]),
               "--logging_steps", "1", "--save_steps", "100000", "--external_plugins", str(plugin),
               "--reward_funcs", "length_reward", "--beta", str(beta), "--temperature", "1.0", "--top_p", "1.0",
               "--top_k", "0", "--learning_rate", "1e-5", "--report_to", "none", "--output_dir", str(runs),
               "--add_version", "false", "--split_dataset_ratio", "0", "--device", device]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    records = [json.loads(x) for x in (runs / "logging.jsonl").read_text().splitlines()]
    steps = [r for r in records if "time/rollout_s" in r]
    elapsed = [0.0] + [r["elapsed_s"] for r in steps]
    path = next((line for line in proc.stderr.splitlines() if line.startswith("rollouts:")), "?")
    return {
        "step_s": [round(b - a, 2) for a, b in zip(elapsed, elapsed[1:])],
        "rollout_s": [round(r["time/rollout_s"], 2) for r in steps],
        "reference_s": [round(r["time/reference_s"], 2) for r in steps],
        "update_s": [round(r["time/update_s"], 2) for r in steps],
        "completion_mean_length": [r["completions/mean_length"] for r in steps],
        "peak_gib": max(r.get("memory_gb", 0.0) for r in steps),
        "rollout_path": path,
        "wall_s": round(wall, 1),
    }


def run_trl(out: Path, model: Path, prompts: list[str], cfg: dict, device: str) -> dict:
    """TRL GRPOTrainer + PEFT LoRA, gradient checkpointing, no vLLM: seconds per optimizer step."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ns: dict = {}
    exec(REWARD, ns)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts] * (cfg["steps"] + 1))
    args = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=cfg["accum"], num_generations=cfg["gens"],
        max_completion_length=cfg["completion"], max_steps=cfg["steps"], logging_steps=1, learning_rate=1e-5,
        gradient_checkpointing=True, bf16=device == "cuda", use_cpu=device != "cuda", report_to=[],
        save_strategy="no", model_init_kwargs={"dtype": torch.bfloat16 if device == "cuda" else torch.float32})
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(model), reward_funcs=ns["length_reward"], args=args, train_dataset=dataset,
                          peft_config=peft, callbacks=[Clock()])
    trainer.train()
    steps = [round(b - a, 2) for a, b in zip(stamps, stamps[1:])]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    del trainer
    return {"step_s": steps, "peak_gib": round(peak, 2)}


def steady(steps: list[float]) -> float | None:
    """Median seconds per step after the first (compiles, graph captures, autotuning)."""
    rest = steps[1:] or steps
    return statistics.median(rest) if rest else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/grpo-gpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    parser.add_argument("--skip_trl", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short completions")
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    device = "cpu" if opts.smoke else "cuda"
    cfg = dict(gens=8, completion=512, batch=8, accum=8, prompts=8, words=48, steps=opts.steps)
    if opts.smoke:
        cfg.update(gens=4, completion=12, batch=4, accum=2, prompts=2, words=12, steps=2)
    out = Path(opts.out + ("-smoke" if opts.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    model = out / ("tiny-qwen2" if opts.smoke else "qwen2.5-7b-random")
    build_model(model, TINY if opts.smoke else QWEN25_7B, device)
    data = out / "prompts.jsonl"
    prompts = write_prompts(data, cfg["prompts"], cfg["words"])
    plugin = out / "length_reward.py"
    plugin.write_text(REWARD)
    results: dict = {"config": cfg, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    for beta in opts.betas:
        results[f"lorakit_beta{beta:g}"] = run_lorakit(out, model, data, plugin, cfg, beta, device)
        print(json.dumps({f"lorakit_beta{beta:g}": results[f"lorakit_beta{beta:g}"]}), flush=True)
    if not opts.skip_trl:
        try:
            results["trl"] = run_trl(out, model, prompts, cfg, device)
        except Exception as exc:  # report, keep lorakit's figures
            results["trl"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"trl": results["trl"]}), flush=True)
    trl_s = steady(results.get("trl", {}).get("step_s", [])) or (None if opts.smoke else TRL_REFERENCE["step_s"])
    for key, row in results.items():
        if key.startswith("lorakit") and "step_s" in row:
            row["steady_step_s"] = steady(row["step_s"])
            if trl_s and row["steady_step_s"]:
                row["speedup_vs_trl"] = round(trl_s / row["steady_step_s"], 2)
    results["trl_steady_step_s"] = trl_s
    print(json.dumps(results, indent=1))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
