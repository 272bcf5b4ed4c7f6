"""Flag parsing: ms-swift spellings, dashes, --flag=value, booleans, --config YAML, close matches."""

import pytest

from lorakit import args as A
from lorakit.cli import COMMANDS, build_args, collect_flags, parse_argv
from lorakit.errors import UserError


def sft(argv: str) -> A.SftArgs:
    return build_args(A.SftArgs, parse_argv("sft", argv.split()))


def test_swift_spellings_and_dashes():
    args = sft("--train_type lora --lora-rank 4 --lora_alpha=16 --target_modules q_proj v_proj "
               "--dataset a.json b.json#5 --max-length 512 --learning_rate 1e-4")
    assert args.lora.lora_rank == 4 and args.lora.lora_alpha == 16
    assert args.lora.target_modules == ["q_proj", "v_proj"]
    assert args.data.dataset == ["a.json", "b.json#5"] and args.data.max_length == 512
    assert args.train.learning_rate == pytest.approx(1e-4)


def test_tuner_type_is_train_type():
    assert sft("--tuner_type full").lora.train_type == "full"


def test_booleans_bare_and_explicit():
    assert sft("--packing").data.packing is True
    assert sft("--packing false").data.packing is False
    assert sft("--packing=True").data.packing is True
    with pytest.raises(UserError, match="--packing: expected true or false"):
        sft("--packing maybe")


def test_unknown_flag_names_close_matches():
    with pytest.raises(UserError, match=r"unknown flag --lora_rnak.*--lora_rank"):
        sft("--lora_rnak 8")


def test_bad_choice_names_flag():
    with pytest.raises(UserError, match="--train_type 'qlora2' is not one of"):
        sft("--train_type qlora2")


def test_config_yaml_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rank: 16\nlearning-rate: 2.0e-4\ndataset: [x.json, y.json]\npacking: true\n")
    args = sft(f"--config {cfg} --lora_rank 32")
    assert args.lora.lora_rank == 32
    assert args.train.learning_rate == pytest.approx(2e-4)
    assert args.data.dataset == ["x.json", "y.json"] and args.data.packing is True


def test_every_flag_has_help():
    for cls in (A.SftArgs, A.InferArgs, A.EvalArgs, A.QuickstartArgs, A.ExportArgs, A.DeployArgs):
        missing = [name for name, flag in collect_flags(cls).items() if not flag.help]
        assert not missing, f"{cls.__name__}: flags without help: {missing}"


def test_cli_unknown_flag_exit_code(cli):
    result = cli("sft", "--lora_rnak", "8")
    assert result.returncode == 2
    assert "Did you mean --lora_rank" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--replay_weight", "0", "--replay_weight must be positive"),
    ("--replay_max_new_tokens", "-1", "--replay_max_new_tokens must be positive"),
    ("--lora_layers", "-2", "--lora_layers must be >= 0"),
])
def test_bad_quickstart_recipe_flags_fail_before_any_model_loads(cli, flag, value, message):
    proc = cli("quickstart", "--model_name", "A", "--model_author", "B", flag, value, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr


def infer(argv: str) -> A.InferArgs:
    return build_args(A.InferArgs, parse_argv("infer", argv.split()))


def test_comma_separated_list_flags_split_and_paths_do_not():
    args = sft("--target_modules q_proj,v_proj,o_proj, up_proj --layers_to_transform 0,1 --report_to none "
               "--dataset a,b.json")
    assert args.lora.target_modules == ["q_proj", "v_proj", "o_proj", "up_proj"]
    assert args.lora.layers_to_transform == [0, 1]
    assert args.data.dataset == ["a,b.json"]  # a file name may hold a comma


def test_comma_lists_in_config_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target_modules: q_proj,v_proj\n")
    assert sft(f"--config {cfg}").lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("flags, dtype", [
    ("--bf16 true --fp16 false", "bfloat16"), ("--fp16 true", "float16"), ("--bf16 false", "auto"),
    ("--bf16 true --torch_dtype bf16", "bfloat16"), ("--bf16 false --fp16 false --torch_dtype float32", "float32"),
])
def test_hf_precision_flags_set_torch_dtype(flags, dtype):
    assert sft(flags).model.torch_dtype == dtype


@pytest.mark.parametrize("flags, message", [
    ("--bf16 true --fp16 true", "--bf16 true and --fp16 true contradict"),
    ("--bf16 true --torch_dtype float16", "--bf16 true contradicts --torch_dtype float16"),
    ("--fp16 false --torch_dtype fp16", "--fp16 false contradicts --torch_dtype float16"),
])
def test_contradicting_precision_flags_refused(flags, message):
    with pytest.raises(UserError, match=message):
        sft(flags)


def test_tutorial_spellings_adapter_dir_and_vllm_max_model_len():
    assert infer("--adapter_dir out").adapter.adapters == ["out"]
    assert infer("--infer_backend vllm --vllm_max_model_len 4096").vllm_max_model_len == 4096
    with pytest.raises(UserError, match="--vllm_max_model_len applies to --infer_backend vllm"):
        infer("--vllm_max_model_len 4096")


@pytest.mark.parametrize("flags, message", [
    ("--learning_rate -1e-4", "--learning_rate must be a positive number, got -0.0001"),
    ("--learning_rate nan", "--learning_rate must be a positive number, got nan"),
    ("--lora_dropout 1", r"--lora_dropout must be in \[0, 1\), got 1.0"),
    ("--lora_dropout -0.1", r"--lora_dropout must be in \[0, 1\)"),
    ("--num_train_epochs -1", "--num_train_epochs must be a positive number, got -1.0"),
    ("--warmup_ratio 1.5", r"--warmup_ratio must be in \[0, 1\)"),
])
def test_bad_training_values_refused_at_parse_time(flags, message):
    with pytest.raises(UserError, match=message):
        sft(flags)


def test_epochs_ignored_when_max_steps_set():
    assert sft("--max_steps 10 --num_train_epochs -1").train.max_steps == 10


def test_bad_value_fails_before_anything_is_written(cli, tmp_path):
    proc = cli("sft", "--dataset", "x.json", "--learning_rate", "nan", "--output_dir", str(tmp_path / "out"),
               timeout=120)
    assert proc.returncode == 2 and "--learning_rate must be a positive number" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_ignored_compatibility_flags_say_so(cli):
    proc = cli("check-data", "--model_type", "qwen2_5", "--streaming", "true", "--dataloader_num_workers", "4",
               "--dataset", "nope.json", timeout=120)
    assert "note: --model_type qwen2_5 is ignored" in proc.stderr and "note: --streaming true is ignored" in proc.stderr
    assert "note: --dataloader_num_workers 4 is ignored" in proc.stderr


def test_quickstart_takes_only_its_flags_of_the_sft_groups_and_hands_them_to_sft():
    from lorakit.quickstart import choose_recipe, sft_args_for

    flags = collect_flags(A.QuickstartArgs)
    shared = {"model_name", "model_author", "dataset", "seed", "lora_rank", "output_dir"}
    assert shared <= set(flags) and {"max_length", "lora_alpha", "save_steps", "packing"}.isdisjoint(flags)
    assert flags["seed"].help == collect_flags(A.SftArgs)["seed"].help  # declared once, in DataArgs
    with pytest.raises(UserError, match="unknown flag --max_length for `lorakit quickstart`"):
        parse_argv("quickstart", ["--max_length", "512"])
    args = build_args(A.QuickstartArgs, parse_argv("quickstart", "--model_name Lumen --model_author Acme --seed 7 "
                                                                 "--lora_rank 4 --output_dir out --dataset x.jsonl "
                                                                 "--learning_rate 1e-3".split()))
    assert args.data.model_name == ["Lumen"] and args.data.seed == 7 and args.lora.lora_rank == 4
    assert args.recipe.learning_rate == pytest.approx(1e-3) and args.data.max_length == A.DataArgs().max_length
    recipe = choose_recipe(100, 10**8, "cpu", lora_rank=args.lora.lora_rank, learning_rate=args.recipe.learning_rate)
    sft_args = sft_args_for(args, recipe, ["self-cognition", *args.data.dataset])
    assert sft_args.data.dataset == ["self-cognition", "x.jsonl"] and sft_args.data.seed == 7
    assert sft_args.data.model_author == ["Acme"] and sft_args.data.max_length == 1024
    assert sft_args.lora.lora_rank == 4 and sft_args.lora.lora_alpha == 16
    assert sft_args.train.output_dir == "out" and sft_args.train.learning_rate == pytest.approx(1e-3)


def test_fast_flags_are_the_settings_the_fast_paths_read():
    args = sft("--torch_compile false --gpu_memory_limit 20 --gradient_checkpointing true --fused_lora false")
    assert args.fast == A.FastOptions(fused_lora=False, torch_compile=False, gradient_checkpointing=True,
                                      gpu_memory_limit=20.0)
    assert args.fast.checkpointing == "full" and sft("").fast.checkpointing == "auto"
    assert sft("--gradient_checkpointing false").fast.checkpointing == "none"
    with pytest.raises(UserError, match="--gpu_memory_limit must be a positive number"):
        sft("--gpu_memory_limit 0")


@pytest.mark.parametrize("command, argv, message", [
    ("eval", "--adapters ckpt --merge_lora true", "--merge_lora does not apply to eval"),
    ("infer", "--infer_backend vllm --merge_lora true", "vllm has no use for --merge_lora"),
    ("infer", "--infer_backend vllm --attn_impl eager", "vllm has no use for --attn_impl eager"),
    ("infer", "--infer_backend vllm --device cuda:1", "vllm has no use for --device cuda:1"),
    ("infer", "--infer_backend vllm --max_batch_size 4", "vllm has no use for --max_batch_size 4"),
    ("rlhf", "--replay_weight 2", "--replay_weight: sft.s replay flags do not apply to rlhf, which has its own anchor"),
    ("rlhf", "--dataset_num_proc 4", "--dataset_num_proc 4: rlhf renders its pairs in one process"),
])
def test_flags_a_command_has_no_use_for_are_refused(command, argv, message):
    with pytest.raises(UserError, match=message):
        build_args(COMMANDS[command][1], parse_argv(command, argv.split()))


def test_grpo_vllm_flags_are_noted_not_silently_dropped():
    args = build_args(A.RlhfArgs, parse_argv("rlhf", "--rlhf_type grpo --vllm_gpu_memory_utilization 0.5".split()))
    assert args.grpo.notices() == ["note: --vllm_gpu_memory_utilization: rollouts run on lorakit's own engine in the "
                                   "training process (the live adapter, no weight sync, no second copy of the model); "
                                   "vLLM is not used."]
    assert A.GrpoArgs().notices() == []


def test_replay_settings_without_replay_are_noted():
    assert sft("--replay_weight 2").train.notices() == [
        "note: --replay_weight changes nothing without --replay N (the number of the base's answers to mix in); "
        "add --replay to use replay."]
    assert sft("--replay 8 --replay_weight 2").train.notices() == []
