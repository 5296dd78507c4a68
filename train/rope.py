"""RoPE scaling for long-context fine-tuning, written into the model's own `config.rope_parameters`.

    datagen train --data DIR --context-length 32768 --rope linear --out runs/long --merge

The model code stays transformers' (STYLE.md rule 15): its rotary embedding reads `rope_parameters` through
`ROPE_INIT_FUNCTIONS` (transformers: modeling_rope_utils.py), so the scaling is a config change made before the
weights load. The saved and merged model carries it in config.json, and vLLM reads the same fields.

- linear: Position Interpolation (Chen et al. 2023, "Extending Context Window of Large Language Models via
  Positional Interpolation", section 2.2): position m is used as m / s, s = L / L_original.
- dynamic: dynamic NTK (bloc97 and emozilla, reddit r/LocalLLaMA 2023): the RoPE base grows with the sequence
  length once it passes the original length; shorter sequences keep the original angles. Refused: vLLM does not
  serve the model transformers trains. Its DynamicNTKScalingRotaryEmbedding fixes the base at the longest length
  for every sequence (transformers keeps the original base up to the original length and grows it with each
  sequence's length) and builds its cos/sin cache for max_position_embeddings rows only, so positions past the
  original length read outside it (NaN log-probs past 256 positions on a tiny Llama x4). A base that depends on
  the sequence's length cannot share one KV cache anyway, so no config makes the two agree.
- yarn: YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models", section
  3.2-3.4): NTK-by-parts interpolation plus the attention temperature 0.1 ln(s) + 1; transformers' defaults
  beta_fast 32, beta_slow 1 are the paper's alpha and beta for Llama.

Transformers 5 needs `rope_parameters` (a dict with rope_type, factor, rope_theta and, for YaRN,
original_max_position_embeddings); a config that sets only the old `rope_scaling` fails at load.
"""

from __future__ import annotations

import enum
from typing import Any

from datagen.errors import BadInput


class RopeType(str, enum.Enum):
    linear = "linear"
    """Position Interpolation: every position divided by the factor."""
    dynamic = "dynamic"
    """Dynamic NTK: the base grows with the sequence length past the original length. Refused (DYNAMIC_REFUSED)."""
    yarn = "yarn"
    """YaRN: NTK-by-parts interpolation and an attention temperature."""


DYNAMIC_REFUSED = (
    "--rope dynamic: vLLM would not serve it as transformers trains it (a fixed NTK base, no positions past the "
    "original length); use --rope yarn or --rope linear"
)


def scaled_rope(rope_parameters: dict[str, Any], original_length: int, context_length: int, rope: RopeType,
                factor: float | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """The new `rope_parameters` and `max_position_embeddings` for `context_length` tokens.

    factor defaults to context_length / original_length. max_position_embeddings becomes original x factor for
    YaRN, and stays the original length for linear and dynamic, which is what both readers of the field expect:
    vLLM takes the context length of a linear or dynamic model to be max_position_embeddings x factor and of a YaRN
    model to be max_position_embeddings (vllm/config/model.py, _get_and_verify_max_len), and transformers' dynamic
    NTK reads max_position_embeddings as the pretraining length, leaving every shorter sequence unscaled
    (modeling_rope_utils.py, _compute_dynamic_ntk_parameters); its linear scaling does not read the field.
    """
    if rope is RopeType.dynamic:
        raise BadInput(DYNAMIC_REFUSED)
    current = rope_parameters.get("rope_type", "default")
    if current != "default":
        raise BadInput(
            f"--rope: the model already has rope_type '{current}' in its config; extend its unscaled base model instead"
        )
    if context_length <= original_length and factor is None:
        raise BadInput(
            f"--context-length {context_length} is not longer than the model's {original_length} positions: "
            "no RoPE scaling needed (drop --context-length, or pass --rope-factor)"
        )
    factor = float(factor if factor is not None else context_length / original_length)
    if factor < 1.0:
        raise BadInput(f"--rope-factor {factor}: must be at least 1 (1 = no scaling)")
    scaled = {"rope_type": rope.value, "rope_theta": rope_parameters["rope_theta"], "factor": factor}
    if "partial_rotary_factor" in rope_parameters:
        scaled["partial_rotary_factor"] = rope_parameters["partial_rotary_factor"]
    if rope is RopeType.yarn:
        scaled["original_max_position_embeddings"] = original_length
    return scaled, round(original_length * factor) if rope is RopeType.yarn else original_length


def scaled_config(model_path: str, context_length: int | None, rope: RopeType, factor: float | None = None):
    """The model's config with its RoPE scaled for context_length, to pass as `from_pretrained(config=...)`;
    None when no context length is asked for (load the model as it is)."""
    if context_length is None:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    parameters = getattr(config, "rope_parameters", None)
    if not parameters or "rope_theta" not in parameters:
        raise BadInput(f"--context-length: {model_path} has no RoPE parameters in its config (not a RoPE model)")
    config.rope_parameters, config.max_position_embeddings = scaled_rope(
        dict(parameters), config.max_position_embeddings, context_length, rope, factor
    )
    return config
