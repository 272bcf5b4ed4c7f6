"""Flag parsing: ms-swift spellings, dashes, --flag=value, booleans, --config YAML, close matches."""

import pytest

from lorakit import args as A
from lorakit.cli import build_args, collect_flags, parse_argv
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
