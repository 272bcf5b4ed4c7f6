"""One GRPO step, lorakit vs TRL's GRPOTrainer + PEFT, in the same run: seconds per step and its split.

Qwen2.5-7B architecture with random bf16 weights (saved once as safetensors with the Qwen2.5 tokenizer),
LoRA r16 (alpha 32, dropout 0) on all linear layers, 8 prompts x 8 generations x 512 completion tokens per
optimizer step (--per_device_train_batch_size 8 x --gradient_accumulation_steps 8 completions), a length
reward, TRL's sampling defaults (temperature 1, no top-k / top-p) and beta 0 (TRL 1.16's default; skips the
reference pass; --betas 0 0.04 adds a row with ms-swift's beta, which pays it).

Equal work on both sides: every prompt renders to the same number of tokens, and no completion ends early
(random weights would emit an end token now and then): lorakit samples with ignore_eos (vLLM's name), TRL
with generation_kwargs={"min_new_tokens": 512}. Both report their completion lengths, all 512.

Each part runs in its own process with its own time limit (--build_timeout, --lorakit_timeout,
--trl_timeout), its output streamed live with a timestamp, its figures printed as one `RESULT {...}` line as
soon as it ends (lorakit's before TRL starts); a part that hangs is killed and the next one runs.
- lorakit: `lorakit rlhf --rlhf_type grpo` through its CLI in the child process (the only change: the
  rollouts' ignore_eos), 3 steps; the step times and the rollout / reference / update split come from its
  logging.jsonl, which rollout decoder served (fast decoder, CUDA graphs, compiled or not) from the engine.
- TRL: GRPOTrainer(peft_config=LoraConfig(...)), gradient checkpointing, no vLLM, 2 steps; the time of each
  optimizer step and, inside it, of generation + scoring (`_generate_and_score_completions`).
The figure is the median of the steps after the first (the first compiles and captures). TRL's figure from
the issue (H200, 2026-12-02): 31 s per step after the first (59.5 s first), 36.8 GiB.

Where lorakit's step should go (H200, ~4.8 TB/s, ~700 TFLOP/s bf16):
- rollout: 512 decode steps of 64 rows, each reading the 14.1 GB of weights (3.5 ms at ~4 TB/s) plus the
  KV cache (64 rows x 768 columns x 57 KB = 2.8 GB, 0.7 ms) plus the live adapter's small GEMMs (~0.5 ms),
  one CUDA graph per step, sampling in a few batched kernels: ~5 ms x 512 = ~2.7 s, prefill ~0.2 s;
- reference: 0 with beta 0 (the pass is skipped);
- update: 64 x (prompt + 512) = ~38k tokens forward + backward at ~15k tok/s (sft's measured LoRA rate,
  no recompute: 'auto' checkpointing keeps every layer's activations, ~21 GB a micro-batch) = ~2.5 s.
  Total ~5.5 s against the 6.2 s target (TRL / 5).

    pip install --no-index --no-deps .whl/small/*.whl    # trl, datasets, ... (the GPU machine is offline)
    PYTHONUNBUFFERED=1 python bench/grpo_gpu.py --out /tmp/grpo-gpu [--json grpo.json]
    python bench/grpo_gpu.py --smoke        # CPU, tiny model: a dry run of this script's logic (~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
TRL_REFERENCE = {"step_s": 31.0, "first_step_s": 59.5, "peak_gib": 36.8}
TARGET_S = 6.2
REWARD = '''
def length_reward(completions, **kwargs):
    return [min(len(c), 2000) / 2000 for c in completions]
'''
WORDS = ("river stone garden music number city learn write read small large quick slow bright dark open close "
         "start finish model data token answer question light").split()


@dataclasses.dataclass
class Config:
    gens: int = 8
    completion: int = 512
    batch: int = 8  # completions per micro-batch
    accum: int = 8
    prompts: int = 8  # per step
    words: int = 48
    steps: int = 3  # lorakit
    trl_steps: int = 2

    @classmethod
    def smoke(cls) -> Config:
        return cls(gens=4, completion=12, batch=4, accum=2, prompts=2, words=12, steps=2, trl_steps=2)


# ---------------------------------------------------------------- the parent: files, children, report


def write_prompts(path: Path, cfg: Config) -> list[str]:
    """cfg.prompts x steps prompts of random single-token words, every one the same length once rendered."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    words = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1]
    rng = random.Random(0)
    n = cfg.prompts * (max(cfg.steps, cfg.trl_steps) + 1)
    prompts = ["Story:" + "".join(" " + rng.choice(words) for _ in range(cfg.words)) for _ in range(n)]
    lengths = {len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
               for p in prompts}
    if len(lengths) != 1:
        raise SystemExit(f"prompts render to different lengths {sorted(lengths)}: the step shapes would vary")
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"{n} prompts of {lengths.pop()} tokens each (chat template included)", flush=True)
    return prompts


def run_child(name: str, args: list[str], timeout: float) -> tuple[int | None, float]:
    """Run `python bench/grpo_gpu.py --child ...` in its own process group, its output streamed with
    timestamps; killed after `timeout` seconds. Returns (exit code or None when killed, seconds)."""
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="2")
    started = time.perf_counter()
    print(f"== {name}: started (limit {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    reader = threading.Thread(target=_echo, args=(proc.stdout, name, started), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"== {name}: over its {timeout:.0f} s limit, stopping it", flush=True)
        _stop(proc)
        code = None
    reader.join(timeout=5)
    seconds = time.perf_counter() - started
    print(f"== {name}: {'exit ' + str(code) if code is not None else 'killed'} after {seconds:.1f} s", flush=True)
    return code, seconds


def _echo(stream, name: str, started: float) -> None:
    """Print the child's output line by line (tqdm's carriage returns too) with the seconds since it started."""
    pending = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").rstrip()
            if text:
                print(f"[{name} {time.perf_counter() - started:6.1f}s] {text}", flush=True)
    if pending.strip():
        print(f"[{name} {time.perf_counter() - started:6.1f}s] {pending.decode(errors='replace')}", flush=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's own process group, SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def lorakit_result(run_dir: Path, decoder_file: Path, code: int | None, seconds: float) -> dict:
    """Per-step figures from the run's logging.jsonl (whatever steps finished, even after a kill)."""
    log = run_dir / "logging.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    steps = [r for r in records if "time/rollout_s" in r]
    elapsed = [0.0] + [r["elapsed_s"] for r in steps]
    out = {
        "exit": code, "wall_s": round(seconds, 1),
        "step_s": [round(b - a, 2) for a, b in zip(elapsed, elapsed[1:])],
        "rollout_s": [round(r["time/rollout_s"], 2) for r in steps],
        "reference_s": [round(r["time/reference_s"], 2) for r in steps],
        "update_s": [round(r["time/update_s"], 2) for r in steps],
        "completion_length": [[r["completions/min_length"], r["completions/max_length"]] for r in steps],
        "peak_gib": max((r.get("memory_gb", 0.0) for r in records), default=None),
    }
    if decoder_file.is_file():
        out["rollout_decoder"] = json.loads(decoder_file.read_text())
    out["steady_step_s"] = steady(out["step_s"])
    return out


def trl_result(path: Path, code: int | None, seconds: float) -> dict:
    out = json.loads(path.read_text()) if path.is_file() else {}
    out.update(exit=code, wall_s=round(seconds, 1))
    out["steady_step_s"] = steady(out.get("step_s", []))
    return out


def steady(steps: list[float]) -> float | None:
    """Median seconds per step after the first (it compiles, captures graphs, autotunes)."""
    rest = steps[1:]
    return round(statistics.median(rest), 2) if rest else None


def split_line(row: dict) -> str:
    if not row.get("steady_step_s"):
        return "no step after the first finished"
    k = len(row["step_s"]) - 1  # the last step's split
    return (f"{row['steady_step_s']} s/step after the first (last step: rollout {row['rollout_s'][k]} s, "
            f"reference {row['reference_s'][k]} s, update {row['update_s'][k]} s; first step {row['step_s'][0]} s), "
            f"completions {row['completion_length'][k]} tokens, peak {row['peak_gib']} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/grpo-gpu")
    parser.add_argument("--steps", type=int, default=None, help="lorakit steps (default 3)")
    parser.add_argument("--trl_steps", type=int, default=None, help="TRL steps (default 2)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0])
    parser.add_argument("--skip_trl", action="store_true")
    parser.add_argument("--skip_lorakit", action="store_true")
    parser.add_argument("--build_timeout", type=float, default=120)
    parser.add_argument("--lorakit_timeout", type=float, default=220)
    parser.add_argument("--trl_timeout", type=float, default=240)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short completions")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=["build", "lorakit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rollout_compiles", nargs="+", default=["default"],
                        help="torch.compile modes of the rollout decoder to run (default: lorakit's own choice; "
                             "e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--rollout_compile", default="default", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    cfg = Config.smoke() if opts.smoke else Config()
    cfg.steps = opts.steps or cfg.steps
    cfg.trl_steps = opts.trl_steps or cfg.trl_steps
    out = Path(opts.out + ("-smoke" if opts.smoke else ""))
    model = out / ("tiny-qwen2" if opts.smoke else "qwen2.5-7b-random")
    if opts.child:
        {"build": child_build, "lorakit": child_lorakit, "trl": child_trl}[opts.child](opts, cfg, out, model)
        return

    out.mkdir(parents=True, exist_ok=True)
    data, plugin = out / "prompts.jsonl", out / "length_reward.py"
    write_prompts(data, cfg)
    plugin.write_text(REWARD)
    common = ["--out", opts.out] + (["--smoke"] if opts.smoke else []) + ["--steps", str(cfg.steps),
                                                                        "--trl_steps", str(cfg.trl_steps)]
    results: dict = {"config": dataclasses.asdict(cfg), "trl_issue_figure": TRL_REFERENCE}
    if not (model / "config.json").is_file():
        code, _ = run_child("build", ["--child", "build", *common], opts.build_timeout)
        if code != 0:
            raise SystemExit("building the random model failed; nothing to measure")
    if not opts.skip_lorakit:
        for beta, mode in [(b, m) for b in opts.betas for m in opts.rollout_compiles]:
            name = child_name(beta, mode)
            code, seconds = run_child(name, ["--child", "lorakit", "--beta", str(beta), "--rollout_compile", mode,
                                             *common], opts.lorakit_timeout)
            results[name] = lorakit_result(out / name, out / f"{name}-decoder.json", code, seconds)
            print("RESULT " + json.dumps({name: results[name]}), flush=True)
            print(f"== {name}: {split_line(results[name])}", flush=True)
    if not opts.skip_trl:
        code, seconds = run_child("trl", ["--child", "trl", *common], opts.trl_timeout)
        results["trl"] = trl_result(out / "trl-result.json", code, seconds)
        print("RESULT " + json.dumps({"trl": results["trl"]}), flush=True)
    summarize(results, opts.smoke)
    print(json.dumps(results, indent=1), flush=True)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


def child_name(beta: float, mode: str) -> str:
    return f"lorakit_beta{beta:g}" + ("" if mode == "default" else f"_{mode}")


def summarize(results: dict, smoke: bool) -> None:
    trl = (results.get("trl") or {}).get("steady_step_s")
    trl_note = "TRL in this run"
    if trl is None and not smoke:
        trl, trl_note = TRL_REFERENCE["step_s"], "TRL's figure from the issue (this run has none)"
    for key, row in results.items():
        if key.startswith("lorakit") and row.get("steady_step_s"):
            line = f"== {key}: {split_line(row)}"
            if trl:
                row["speedup_vs_trl"] = round(trl / row["steady_step_s"], 2)
                line += f"; vs {trl_note} {trl} s/step: x{row['speedup_vs_trl']}"
            if not smoke:
                line += f"; target <= {TARGET_S} s: {'met' if row['steady_step_s'] <= TARGET_S else 'NOT met'}"
            print(line, flush=True)


# ---------------------------------------------------------------- the children


def child_build(opts, cfg: Config, out: Path, folder: Path) -> None:
    """Random-weight Qwen2 (the 7B shape, or the tiny one) saved as safetensors with the tokenizer."""
    import torch

    from qwen_arch import QWEN25_7B, TINY, build_random_qwen2

    started = time.perf_counter()
    device = "cpu" if opts.smoke else "cuda"
    model = build_random_qwen2(TINY if opts.smoke else QWEN25_7B, torch.float32 if opts.smoke else torch.bfloat16,
                               device)
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="5GB")
    for f in TOKENIZER.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, partial / f.name)
    partial.rename(folder)  # a killed build leaves no half-written model behind
    print(f"saved to {folder} in {time.perf_counter() - started:.1f} s", flush=True)


def child_lorakit(opts, cfg: Config, out: Path, model: Path) -> None:
    """`lorakit rlhf --rlhf_type grpo` in this process, with ignore_eos on the rollouts."""
    import torch

    from lorakit import cli
    from lorakit.rlhf import grpo, grpo_session

    name = child_name(opts.beta, opts.rollout_compile)
    run_dir = out / name
    if opts.rollout_compile != "default":
        grpo_session.ROLLOUT_COMPILE = opts.rollout_compile
    shutil.rmtree(run_dir, ignore_errors=True)
    sampling = grpo.sampling
    grpo.sampling = lambda args: dataclasses.replace(sampling(args), ignore_eos=True)  # equal work: every reply 512
    sessions = []
    new_session = grpo_session.new_session
    if opts.smoke:  # the CPU dry run decodes with the GPU's decoder too (static cache + live adapter; no graph)
        engine = grpo_session.Engine
        grpo_session.Engine = lambda *a, **k: engine(*a, **{**k, **({} if k.get("fast") is False else dict(
            fast=True, compile=False, cuda_graphs=False))})

    def keep(*args, **kwargs):
        sessions.append(new_session(*args, **kwargs))
        return sessions[-1]

    grpo.new_session = keep
    device = "cpu" if opts.smoke else "cuda"
    argv = ["rlhf", "--rlhf_type", "grpo", "--model", str(model), "--dataset", str(out / "prompts.jsonl"),
            "--train_type", "lora", "--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0",
            "--num_generations", str(cfg.gens), "--max_completion_length", str(cfg.completion),
            "--per_device_train_batch_size", str(cfg.batch), "--gradient_accumulation_steps", str(cfg.accum),
            "--max_steps", str(cfg.steps), "--logging_steps", "1", "--save_steps", "100000",
            "--external_plugins", str(out / "length_reward.py"), "--reward_funcs", "length_reward",
            "--beta", str(opts.beta), "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0",
            "--learning_rate", "1e-5", "--report_to", "none", "--output_dir", str(run_dir), "--add_version", "false",
            "--split_dataset_ratio", "0", "--device", device]
    print("lorakit " + " ".join(argv), flush=True)
    code = cli.main(argv)
    if sessions:
        engine = sessions[-1].engine
        fast = engine._fast
        state = fast.state if fast is not None else None
        decoder = {"fast_decoder": engine.uses_fast_path, "why_not": engine.fast_note,
                   "compiled": bool(fast and fast.compiled), "cuda_graphs_by_width": sorted(state.graphs) if state is not None else [],
                   "cache_rows_x_columns": [state.rows, state.length] if state is not None else None,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        (out / f"{name}-decoder.json").write_text(json.dumps(decoder))
        print(f"rollout decoder: {decoder}", flush=True)
    sys.exit(code)


def child_trl(opts, cfg: Config, out: Path, model: Path) -> None:
    """TRL GRPOTrainer + PEFT LoRA, gradient checkpointing, no vLLM: seconds per optimizer step, generation inside."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = not opts.smoke
    ns: dict = {}
    exec(REWARD, ns)
    result: dict = {"step_s": [], "generate_s": [], "completion_length": []}
    path = out / "trl-result.json"
    path.unlink(missing_ok=True)
    stamps: list[float] = []

    def save() -> None:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        path.write_text(json.dumps(result))

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            result["step_s"].append(round(time.perf_counter() - stamps[-1], 2))
            save()
            print(f"trl step {len(result['step_s'])}: {result['step_s'][-1]} s", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/min_length" in logs:
                result["completion_length"].append([logs["completions/min_length"], logs["completions/max_length"]])

    prompts = [json.loads(x)["prompt"] for x in (out / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    args = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=cfg.batch, gradient_accumulation_steps=cfg.accum,
        num_generations=cfg.gens, max_completion_length=cfg.completion, max_steps=cfg.trl_steps, logging_steps=1,
        learning_rate=1e-5, beta=0.0, temperature=1.0, gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda,
        report_to=[], save_strategy="no", model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
        generation_kwargs={"min_new_tokens": cfg.completion}, shuffle_dataset=False)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = GRPOTrainer(model=str(model), reward_funcs=ns["length_reward"], args=args, train_dataset=dataset,
                          peft_config=peft, callbacks=[Clock()])
    generate = trainer._generate_and_score_completions

    def timed(*a, **k):  # TRL's rollout: generation, rewards, advantages (inside the step's time)
        started = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            if cuda:
                torch.cuda.synchronize()
            result["generate_s"].append(round(time.perf_counter() - started, 2))

    trainer._generate_and_score_completions = timed
    trainer.train()
    save()


if __name__ == "__main__":
    main()
