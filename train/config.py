"""The one typed configuration of `datagen train`: every knob, its default, and where the default comes from.

Precedence, lowest to highest: the defaults below < the YAML file (`--config`) < `--set key=value` < named flags.
Unknown keys are errors (a typo in a YAML file must not silently train with a default). The resolved config,
with the learning rate filled in for the method, is saved as OUT/train_config.yaml beside the outputs.

Sources of the defaults:
- Stanford Alpaca (tatsu-lab/stanford_alpaca, README "Fine-tuning" and its training command): full fine-tuning
  with learning rate 2e-5, 3 epochs, weight decay 0, cosine schedule with warmup ratio 0.03, batch size 128.
- QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA on all linear layers is
  needed to match full fine-tuning; learning rate 2e-4, LoRA dropout 0.05 and batch size 16 for 7B-13B models;
  NF4 weights with double quantization and bf16 compute.
- TRL 1.16 SFTConfig: max_length 1024, packing strategy "bfd", gradient checkpointing on.
- LongLoRA (Chen et al. 2024, section 3.2-3.3 and dvlab-research/LongLoRA llama_attn_replace.py, fine-tune.py):
  S²-Attn group size a quarter of the sequence; LoRA+ trains the embeddings and norms beside the adapters.
"""

from __future__ import annotations

import difflib
import enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datagen.errors import BadInput
from datagen.jsonl import read_config_file
from train.rope import RopeType


class Method(str, enum.Enum):
    full = "full"
    """Every weight trains (fp32 master weights)."""
    lora = "lora"
    """Low-rank adapters on a frozen base (peft LoraConfig)."""
    qlora = "qlora"
    """LoRA on a base frozen in 4-bit NF4 (bitsandbytes): the same recipe with a quantized base."""
    dora = "dora"
    """Weight-decomposed LoRA (Liu et al. 2024): LoRA plus a trained magnitude vector (peft use_dora)."""


class Precision(str, enum.Enum):
    auto = "auto"
    """bf16 mixed precision on a GPU that supports it, else fp32. On the 2-core test CPU (avx512_bf16, torch 2.13)
    bf16 autocast made a LoRA step 1.9x slower than fp32, so CPUs default to fp32."""
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    """GPU only."""


LORA_LEARNING_RATE = 2e-4
"""QLoRA's learning rate for 7B and 13B models; used for lora, qlora and dora."""
FULL_LEARNING_RATE = 2e-5
"""Stanford Alpaca's learning rate for full fine-tuning."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # --- What to train, on what, where -------------------------------------------------------------------------------
    data: str
    """A `datagen export` folder, or a run name/id to export on the fly into OUT/data."""
    out: Path
    """Output folder: adapter (or full model), tokenizer, merged/, checkpoints/, loss curve, summary, config."""
    model: str = "smollm2-135m"
    """Embedded model name, local Hugging Face folder, or hub id (with DATAGEN_ALLOW_HUB=1)."""
    method: Method = Method.lora
    name: str | None = None
    """Name of the training run in the store [default: train-METHOD-TIMESTAMP]."""

    # --- Data ----------------------------------------------------------------------------------------------------------
    max_length: int = Field(1024, gt=0)
    """Tokens per example (longer ones are cut at the end), and the row length when packing (TRL's default;
    Stanford Alpaca used 512)."""
    completion_only_loss: bool = True
    """Loss on the response tokens only (the prompt is masked with -100). Toolformer texts have no prompt:
    their loss covers every token, as in Toolformer's fine-tuning."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens. Examples never attend to each other: position
    ids restart at 0 for each example and the batch is passed padding-free (TRL's bfd strategy), from which
    transformers builds a block-diagonal attention mask. Removes the padding share of the compute."""
    packing_strategy: Literal["bfd", "bfd_split"] = "bfd"
    """Best-fit decreasing; bfd truncates an example longer than max_length, bfd_split splits it. TRL's "wrapped"
    strategy is left out: it cuts examples mid-sequence and lets them attend across the cut."""
    max_train_samples: int | None = Field(None, gt=0)
    """Use only the first N training rows (quick runs)."""
    max_eval_samples: int | None = Field(None, gt=0)
    """Use only the first N rows of the eval split."""
    eval_split: str = "test"
    """The held-out split of the export used for eval loss; no eval when it is missing or empty."""

    # --- LoRA, DoRA, QLoRA ---------------------------------------------------------------------------------------------
    lora_r: int = Field(16, gt=0)
    """Adapter rank."""
    lora_alpha: int = Field(32, gt=0)
    """Scaling numerator: updates are scaled by alpha / r (alpha = 2r is the usual choice)."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """QLoRA's value for 7B-13B models."""
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """'all-linear': every linear layer but the LM head (QLoRA: needed to match full fine-tuning)."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """qlora only: NormalFloat4, QLoRA's data type for normally distributed weights."""
    bnb_4bit_use_double_quant: bool = True
    """qlora only: quantize the quantization constants too (QLoRA: ~0.37 bits per parameter saved)."""

    # --- Optimization --------------------------------------------------------------------------------------------------
    learning_rate: float | None = Field(None, gt=0)
    """None: 2e-4 for lora/qlora/dora (QLoRA), 2e-5 for full (Stanford Alpaca)."""
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Stanford Alpaca's schedule."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Share of the steps spent warming up linearly from 0 (Stanford Alpaca: 0.03)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Stanford Alpaca: 0."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (transformers' default)."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training split (Stanford Alpaca: 3); ignored when max_steps is set."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides epochs."""
    batch_size: int = Field(4, gt=0)
    """Examples (or packed rows) per device per micro-batch."""
    gradient_accumulation_steps: int = Field(4, gt=0)
    """Micro-batches per optimizer step: effective batch = batch_size x this x processes (16 on one device,
    QLoRA's batch size for 7B-13B models)."""
    eval_batch_size: int | None = Field(None, gt=0)
    """None: the same as batch_size."""
    optim: str = "adamw_torch"
    """A transformers optimizer name, e.g. paged_adamw_8bit (bitsandbytes) for QLoRA on a GPU."""
    precision: Precision = Precision.auto
    """Mixed precision of training, and the compute dtype of QLoRA's 4-bit layers (QLoRA: bf16 on a GPU)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less activation memory for ~30% more compute (TRL's
    default). Turn it off for small models where memory is not the limit."""
    seed: int = 42
    """Seeds adapter initialization, shuffling and dropout."""

    # --- Long context (train/rope.py, train/s2_attn.py) ----------------------------------------------------------------
    context_length: int | None = Field(None, gt=0)
    """Extend the model to this many positions by RoPE scaling, written into its config (and so into the saved and
    merged model); max_length defaults to it. None: the model's own positions."""
    rope: RopeType = RopeType.linear
    """How positions are scaled: linear (Position Interpolation), dynamic (dynamic NTK) or yarn."""
    rope_factor: float | None = Field(None, ge=1.0)
    """None: context_length / the model's max_position_embeddings."""
    s2_attn: bool = False
    """Train with LongLoRA's shifted sparse attention (full attention at evaluation and in the saved model)."""
    s2_group_size_ratio: float = Field(0.25, gt=0.0, le=1.0)
    """S²-Attn group size as a share of the sequence length (LongLoRA: group_size_ratio = 1/4, llama_attn_replace.py)."""
    trainable: list[Literal["embed", "norm"]] = []
    """Adapter methods: also train the input embeddings and/or every norm layer in full (LongLoRA's LoRA+, needed
    for long contexts: section 3.3, Table 2). peft modules_to_save "embed_tokens" and every module named *norm."""

    # --- Logging, evaluation, checkpoints ------------------------------------------------------------------------------
    logging_steps: int = Field(1, gt=0)
    """Steps between loss records (the loss curve's resolution)."""
    eval_steps: int | None = Field(None, gt=0)
    """Steps between eval-loss measurements; None: only at the start (eval_at_start) and the end."""
    eval_at_start: bool = True
    """Measure the eval loss before the first step, so the summary shows what training changed."""
    save_steps: int = Field(200, gt=0)
    """Steps between checkpoints in OUT/checkpoints (a killed run resumes from the last one with --resume)."""
    save_total_limit: int | None = Field(2, gt=0)
    """Checkpoints kept; older ones are deleted. None keeps all."""

    # --- Outputs -------------------------------------------------------------------------------------------------------
    merge: bool = False
    """Also write OUT/merged: the adapter merged into the base (never into 4-bit weights), a plain model folder
    for `datagen generate --model OUT/merged` and vLLM. With an eval split, the summary's `merge` entry holds the
    eval loss of the trained model and of the merged one, so the gap is measured on every run."""
    merge_base: Literal["dequantized", "original"] = "dequantized"
    """qlora only: merge into the dequantized 4-bit NF4 base the adapter was trained on (the model that was
    evaluated), or into a fresh load of the original checkpoint (what peft's merge_and_unload on a reloaded base
    does; peft issues #2105, #1080). Measured here (SmolLM2-135M, 4 QLoRA steps, 6 eval rows, fp32): the
    dequantized merge's eval loss is within 1.3e-5 of the trained model's, the original merge's 0.28-0.32 away
    (lower: on a 135M model NF4 costs more than the adapter recovers), so the original merge ships a model nobody
    evaluated. The default departs from the usual recipe (a fresh bf16/fp16 load of the base) for that reason."""
    merged_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of OUT/merged; auto: the dtype the adapter was trained against (lora/dora: the frozen base's, bf16
    under --precision bf16, else fp32; qlora: the 4-bit layers' compute dtype). Measured (as for merge_base): a
    dequantized merge in bfloat16 instead of the float32 the adapter trained against moved the eval loss by
    1.4e-3 to 7.8e-3, 100x the float32 gap; not negligible, so auto is never narrower than training."""
    overwrite: bool = False
    """Delete an existing OUT first."""
    resume: bool = False
    """Continue from the last checkpoint in OUT/checkpoints (run the same command again with --resume)."""

    @model_validator(mode="before")
    @classmethod
    def _default_learning_rate(cls, values: Any) -> Any:
        """Fill in the method's learning rate, so the saved config shows the rate that was used."""
        if isinstance(values, dict) and values.get("learning_rate") is None:
            method = values.get("method", Method.lora)
            full = method is Method.full or method == Method.full.value
            values = {**values, "learning_rate": FULL_LEARNING_RATE if full else LORA_LEARNING_RATE}
        return values

    @model_validator(mode="before")
    @classmethod
    def _max_length_follows_context(cls, values: Any) -> Any:
        """With --context-length and no --max-length, train on rows as long as the new context."""
        if isinstance(values, dict) and values.get("context_length") and values.get("max_length") is None:
            values = {**values, "max_length": values["context_length"]}
        return values

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in OUT and --overwrite deletes it: pass one of them")
        if self.merge and self.method is Method.full:
            raise ValueError("--merge is for adapter methods (lora, qlora, dora); a full fine-tune already writes the whole model to OUT")
        if self.trainable and self.method is Method.full:
            raise ValueError("--trainable is for adapter methods (lora, qlora, dora); a full fine-tune trains every weight")
        if self.rope_factor is not None and self.context_length is None:
            raise ValueError("--rope-factor needs --context-length (the new number of positions)")
        return self

    @property
    def adapter(self) -> bool:
        return self.method is not Method.full

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML scalars (8 → int, 1e-4 → float, true → bool, [a, b] → list)."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set expects key=value, got '{item}'")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise BadInput(f"--set {item}: the value is not valid YAML ({err.problem})") from None
    return values


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML file < overrides (only keys whose value is not None). Errors name the field and the fix."""
    values = read_config_file(path) if path else {}
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    source = f"{path}: " if path else ""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise BadInput(source + "; ".join(_describe(e) for e in err.errors())) from None


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, list(TrainConfig.model_fields), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see examples/train_lora.yaml for every option"
        return f"unknown option '{field}': {hint}"
    if error["type"] == "missing":
        return f"'{field}' is required (--{field.replace('_', '-')})"
    if not field:  # a cross-field check
        return message
    return f"option '{field}': {message} (got {error.get('input')!r})"
