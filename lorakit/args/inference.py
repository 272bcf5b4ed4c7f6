"""Commands that open a model or a checkpoint: infer, eval, export, deploy, web-ui."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.args.checks import check_choice
from lorakit.args.model import ModelArgs
from lorakit.args.quant import BaseQuantArgs
from lorakit.errors import UserError


@dataclass
class GenerationArgs:
    max_new_tokens: int = 512
    "Most tokens generated per reply; a reply cut here is marked as cut."
    temperature: float | None = None
    "Sampling temperature; 0 means greedy and exactly reproducible. Empty: the model's generation_config.json (greedy if it samples not)."
    top_p: float | None = None
    "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. Empty: the model's generation_config.json, else 1."
    top_k: int | None = None
    "Keep only the k most likely tokens (0: no limit). Empty: the model's generation_config.json, else 0."
    repetition_penalty: float | None = None
    "Penalty > 1 lowers the probability of tokens already in the text. Empty: the model's generation_config.json, else 1."
    seed: int = 42
    "Random seed for sampling."
    stream: bool = True
    "Print the reply token by token."

    def __post_init__(self):
        if self.temperature is not None and self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}.")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")


@dataclass
class AdapterArgs:
    adapters: list[str] = field(default_factory=list)
    "Checkpoint folder (or run folder: its last checkpoint). deploy also takes NAME=PATH pairs."
    merge_lora: bool = False
    "Merge the adapter into the base weights."
    system: str | None = None
    "System prompt (text or a .txt path). Empty: the checkpoint's, else the template's default."


INFER_BATCH = 16  # infer's --max_batch_size default


def refuse_for_vllm(args: InferArgs) -> None:
    """Flags of lorakit's own engine that vLLM has no counterpart for are refused, not ignored."""
    wrong = []
    if args.adapter.merge_lora:
        wrong.append("--merge_lora (vLLM applies the adapter per request; `lorakit export` merges it into a folder "
                     "to pass as --model)")
    if args.model.attn_impl != "sdpa":
        wrong.append(f"--attn_impl {args.model.attn_impl} (vLLM picks its own attention backend: "
                     f"VLLM_ATTENTION_BACKEND)")
    if args.model.device is not None:
        wrong.append(f"--device {args.model.device} (vLLM runs on the GPUs CUDA_VISIBLE_DEVICES shows)")
    if args.max_batch_size != INFER_BATCH:
        wrong.append(f"--max_batch_size {args.max_batch_size} (vLLM schedules its own batches)")
    if args.base_quant.quant.enabled:
        wrong.append(f"--quant_bits {args.base_quant.quant.quant_bits} (the vLLM backend loads the base in full "
                     f"precision, a QLoRA checkpoint's too)")
    if wrong:
        raise UserError(f"--infer_backend vllm has no use for {'; '.join(wrong)}. Drop them, or use --infer_backend "
                        f"pt (lorakit's own engine).")


@dataclass
class InferArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    base_quant: BaseQuantArgs = field(default_factory=BaseQuantArgs)
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    query: str | None = None
    "Ask one question, print the answer and exit."
    val_dataset: list[str] = field(default_factory=list)
    "Answer every row of these datasets (batch mode); needs --result_path or writes next to the checkpoint."
    result_path: str | None = None
    "JSONL file for batch results."
    max_batch_size: int = INFER_BATCH
    "Rows generated together in batch mode (lorakit's engine; vLLM schedules its own batches)."
    infer_backend: str = "pt"
    "pt (lorakit's own engine) or vllm (if installed)."
    vllm_max_model_len: int | None = None
    "With --infer_backend vllm: the longest prompt + reply vLLM plans memory for (its max_model_len). Empty: the model's."

    def __post_init__(self):
        check_choice("infer_backend", self.infer_backend, ("pt", "vllm"))
        if self.infer_backend == "vllm":
            refuse_for_vllm(self)
        if self.vllm_max_model_len is not None:
            if self.infer_backend != "vllm":
                raise UserError("--vllm_max_model_len applies to --infer_backend vllm; lorakit's own engine "
                                "(--infer_backend pt) sizes its cache per request: drop the flag or add "
                                "--infer_backend vllm.")
            if self.vllm_max_model_len <= 0:
                raise UserError(f"--vllm_max_model_len must be positive, got {self.vllm_max_model_len}.")


@dataclass
class EvalArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    base_quant: BaseQuantArgs = field(default_factory=BaseQuantArgs)
    model_name: list[str] = field(default_factory=list)
    "The new name the identity probes expect (default: the checkpoint's)."
    model_author: list[str] = field(default_factory=list)
    "The new author the identity probes expect (default: the checkpoint's)."
    eval_output: str | None = None
    "JSON file for the results (default: eval.json beside the checkpoint, or ./eval.json)."
    max_batch_size: int = 32
    "Prompts generated together."
    max_new_tokens: int = 48
    "Most tokens generated per answer (probes and general questions; quickstart's eval uses 48, so its cached base answers are reused)."

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")
        if self.max_batch_size <= 0:
            raise UserError(f"--max_batch_size must be positive, got {self.max_batch_size}.")
        if self.adapter.merge_lora:
            raise UserError("--merge_lora does not apply to eval: it measures the adapter's drift from its base by "
                            "switching the adapter off, which a merged model cannot do; drop --merge_lora.")


@dataclass
class ExportArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    output_dir: str | None = None
    "Output folder (default: <checkpoint>-merged)."
    to_gguf: str | None = None
    "Also write a GGUF file: f16, bf16 or q8_0."
    to_ollama: bool = False
    "Also write an Ollama Modelfile (implies a GGUF file)."
    push_to_hub: str | None = None
    "Upload the result to this hub repository (needs a token and network)."
    hub_token: str | None = None
    "Hub token (default: the one huggingface_hub finds)."
    max_shard_size: str = "5GB"
    "Largest safetensors shard."


@dataclass
class DeployArgs:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    base_quant: BaseQuantArgs = field(default_factory=BaseQuantArgs)
    host: str = "127.0.0.1"
    "Address to listen on."
    port: int = 8000
    "Port to listen on."
    api_key: str | None = None
    "Require 'Authorization: Bearer KEY' on every request."
    served_model_name: str | None = None
    "Name of the model in the API (default: the folder name)."
    max_concurrency: int = 16
    "Requests generated together; more wait in a bounded queue."
    max_queue: int = 64
    "Requests that may wait; past it the server answers 503 with Retry-After."
    max_new_tokens: int = 512
    "Default max_tokens when a request gives none."

    def __post_init__(self):
        if self.max_concurrency <= 0 or self.max_queue < 0:
            raise UserError(f"--max_concurrency must be positive and --max_queue >= 0, got "
                            f"{self.max_concurrency} and {self.max_queue}.")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {self.max_new_tokens}.")
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be in 1-65535, got {self.port}.")


@dataclass
class WebUIArgs:
    host: str = "127.0.0.1"
    "Address to listen on. 0.0.0.0 opens the page to the network: anyone who reaches it can run jobs, so set --auth."
    port: int = 7860
    "Port to listen on."
    lang: str = "en"
    "Language of the labels: en or zh."
    auth: str | None = None
    "user:password asked for before the page opens."
    output_dir: str = "output"
    "Folder the page's training runs go to (the form can change it); its run folders are listed as earlier runs."

    def __post_init__(self):
        check_choice("lang", self.lang, ("en", "zh"))
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be between 1 and 65535, got {self.port}.")
        if self.auth is not None and (":" not in self.auth or not self.auth.split(":", 1)[0]):
            raise UserError(f"--auth takes user:password (for example --auth admin:s3cret), got {self.auth!r}.")
