"""How flags are spelled on the command line: other names people type, comma lists, a command's subset of a group."""

from dataclasses import field

# Other spellings of a flag -> its canonical field name (ms-swift 4.x renamed some flags).
ALIASES = {
    "tuner_type": "train_type",
    "lora_r": "lora_rank",
    "max_seq_length": "max_length",
    "cutoff_len": "max_length",
    "model_name_or_path": "model",
    "adapter_name_or_path": "adapters",
    "ckpt_dir": "adapters",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "adapter_dir": "adapters",
    "quantization_bit": "quant_bits",  # LLaMA-Factory
}

# List flags whose values never contain a comma: `--target_modules q_proj,v_proj` means two values
# (ms-swift and PEFT accept both spellings). Paths, dataset IDs and names keep their commas.
COMMA_LISTS = {"target_modules", "modules_to_save", "layers_to_transform", "report_to"}


def only_flags(group: type, *names: str):
    """A group field of which the command takes only these flags; the group's other fields keep their
    defaults (the CLI lists and accepts just `names`). quickstart shares sft's groups this way."""
    return field(default_factory=group, metadata={"flags": names})
