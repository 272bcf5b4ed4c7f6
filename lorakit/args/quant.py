"""QLoRA: the frozen base loaded 4- or 8-bit by bitsandbytes (--quant_*)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from lorakit.args.checks import check_choice
from lorakit.args.dist import DistArgs
from lorakit.args.training import LoraArgs
from lorakit.errors import UserError

QUANT_METHODS = ("bnb",)


@dataclass
class QuantArgs:
    """Quantized base weights (QLoRA): the frozen base is loaded 4- or 8-bit by bitsandbytes, LoRA trains over it."""

    quant_method: str | None = None
    "bnb (bitsandbytes): load the base model quantized. Empty: full precision (--quant_bits alone implies bnb)."
    quant_bits: int | None = None
    "4 (QLoRA, NF4 by default) or 8 (LLM.int8). LLaMA-Factory's --quantization_bit is the same flag."
    bnb_4bit_quant_type: str | None = None
    "4-bit data type: nf4 (default) or fp4."
    bnb_4bit_use_double_quant: bool | None = None
    "Quantize the 4-bit block scales too (about 0.4 bits per weight less). Default: true."
    bnb_4bit_compute_dtype: str | None = None
    "dtype the 4-bit weights are de-quantized to for each matmul: bfloat16, float16 or float32. Default: --torch_dtype."

    def __post_init__(self):
        if self.quant_method is not None:
            self.quant_method = self.quant_method.lower()
            if self.quant_method == "bitsandbytes":
                self.quant_method = "bnb"
            check_choice("quant_method", self.quant_method, QUANT_METHODS)
        if self.quant_bits is not None and self.quant_bits not in (4, 8):
            raise UserError(f"--quant_bits {self.quant_bits}: bitsandbytes quantizes to 4 or 8 bits; use --quant_bits 4 "
                            f"(QLoRA) or --quant_bits 8.")
        if self.quant_method and self.quant_bits is None:
            raise UserError(f"--quant_method {self.quant_method} needs --quant_bits 4 or 8.")
        if self.quant_bits is not None:
            self.quant_method = self.quant_method or "bnb"
        four_bit = {"bnb_4bit_quant_type": self.bnb_4bit_quant_type, "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
                    "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant}
        given = [f"--{k}" for k, v in four_bit.items() if v is not None]
        if given and self.quant_bits != 4:
            now = "without --quant_bits" if self.quant_bits is None else f"with --quant_bits {self.quant_bits}"
            raise UserError(f"{' '.join(given)} {now}: these flags shape 4-bit weights only; add --quant_bits 4 "
                            f"(or drop them).")
        if self.bnb_4bit_quant_type is not None:
            check_choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        if self.bnb_4bit_compute_dtype is not None:
            check_choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype,
                          ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32"))
            self.bnb_4bit_compute_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
                self.bnb_4bit_compute_dtype, self.bnb_4bit_compute_dtype)
        if self.quant_bits == 4:
            self.bnb_4bit_quant_type = self.bnb_4bit_quant_type or "nf4"
            self.bnb_4bit_use_double_quant = True if self.bnb_4bit_use_double_quant is None else self.bnb_4bit_use_double_quant
        if self.quant_bits is not None and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"--quant_bits {self.quant_bits} needs bitsandbytes: pip install 'bitsandbytes>=0.46'.")

    @property
    def enabled(self) -> bool:
        """True when the base model loads quantized."""
        return self.quant_bits is not None


@dataclass
class BaseQuantArgs:
    """How infer, eval and deploy load the base model: as a checkpoint's args.json records (a QLoRA adapter's base
    loads 4-bit, as it was trained), as --quant_bits says, or in full precision with --full_precision_base."""

    quant: QuantArgs = field(default_factory=QuantArgs)
    full_precision_base: bool = False
    "Load a QLoRA checkpoint's base unquantized, although its args.json records 4/8-bit training (more memory; the answers of the merged export)."

    def __post_init__(self):
        if self.full_precision_base and self.quant.enabled:
            raise UserError(f"--full_precision_base true with --quant_bits {self.quant.quant_bits}: one asks for the "
                            f"full-precision base, the other for a quantized one; drop one of them.")


def refuse_quant_combinations(quant: QuantArgs, lora: LoraArgs, dist: DistArgs) -> None:
    """Quantized bases train LoRA only, and not under FSDP (sft and rlhf share the rule)."""
    if quant.enabled and lora.train_type == "full":
        raise UserError(f"--quant_bits {quant.quant_bits} with --train_type full: quantized weights cannot be "
                        f"trained. Use --train_type lora (QLoRA), or drop --quant_bits to fine-tune in full.")
    if quant.enabled and (dist.fsdp or dist.deepspeed):
        flag = f"--fsdp {' '.join(dist.fsdp)}" if dist.fsdp else f"--deepspeed {dist.deepspeed}"
        raise UserError(f"--quant_bits {quant.quant_bits} with {flag}: FSDP cannot shard bitsandbytes' quantized "
                        f"weights. Drop {flag.split()[0]} (QLoRA runs on one GPU, or one copy per GPU with "
                        f"NPROC_PER_NODE), or drop --quant_bits.")
