"""The other spellings people type for a flag (the CLI reads these before the args classes)."""

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
