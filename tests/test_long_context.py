"""Long-context pieces against transformers' own code at the settings where they must agree.

RoPE scaling (train/rope.py) is checked on the rotary embedding transformers builds from the scaled config;
S²-Attn (train/s2_attn.py) against transformers' sdpa attention, and by which keys each query of each head sees.
All on tiny random-weight models built from a config: nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from datagen.errors import BadInput
from train.config import TrainConfig
from train.rope import RopeType, scaled_rope
from train.s2_attn import register, s2_attention

NATIVE = 256
LONG = 1024


def tiny_config(cls=LlamaConfig, **overrides):
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=NATIVE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    return cls(**{**values, **overrides})


def scaled(rope: RopeType, factor: float | None = None) -> LlamaConfig:
    config = tiny_config()
    config.rope_parameters, config.max_position_embeddings = scaled_rope(dict(config.rope_parameters), NATIVE, LONG, rope, factor)
    return config


def angles(config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = LlamaRotaryEmbedding(config)
    return rotary(torch.zeros(1, 1, 16), positions[None, :])


# --- RoPE scaling ---------------------------------------------------------------------------------------------------------


def test_linear_position_i_gets_the_angles_of_i_over_s():
    config = scaled(RopeType.linear)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert config.max_position_embeddings == NATIVE  # vLLM serves NATIVE x factor
    positions = torch.arange(0, LONG, 7)
    cos, sin = angles(config, positions)
    cos_ref, sin_ref = angles(tiny_config(), positions.float() / 4)
    torch.testing.assert_close(cos, cos_ref)
    torch.testing.assert_close(sin, sin_ref)


def test_rope_factor_overrides_the_ratio():
    config = scaled(RopeType.linear, factor=8)
    assert config.rope_parameters["factor"] == 8.0


def test_yarn_matches_transformers_init_function_and_the_paper_temperature():
    config = scaled(RopeType.yarn)
    assert config.rope_parameters["original_max_position_embeddings"] == NATIVE
    assert config.max_position_embeddings == LONG
    rotary = LlamaRotaryEmbedding(config)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    torch.testing.assert_close(rotary.inv_freq, inv_freq)
    # YaRN section 3.4: sqrt(1/t) = 0.1 ln(s) + 1
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    # the highest frequencies are not interpolated, the lowest are divided by s (NTK-by-parts, section 3.2)
    default = LlamaRotaryEmbedding(tiny_config()).inv_freq
    assert rotary.inv_freq[0] == pytest.approx(default[0].item())
    assert rotary.inv_freq[-1] == pytest.approx(default[-1].item() / 4)


def test_dynamic_matches_transformers_and_leaves_short_sequences_alone():
    config = scaled(RopeType.dynamic)
    assert config.max_position_embeddings == NATIVE  # dynamic NTK reads it as the pretraining length
    rotary = LlamaRotaryEmbedding(config)
    short_cos, _ = rotary(torch.zeros(1, 1, 16), torch.arange(NATIVE)[None])
    default_cos, _ = angles(tiny_config(), torch.arange(NATIVE))
    torch.testing.assert_close(short_cos, default_cos)
    rotary(torch.zeros(1, 1, 16), torch.arange(LONG)[None])
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=LONG)
    torch.testing.assert_close(rotary.inv_freq, inv_freq)
    dim = 16
    base = 10000.0 * (4 * LONG / NATIVE - 3) ** (dim / (dim - 2))  # dynamic NTK's base at length L
    torch.testing.assert_close(rotary.inv_freq, 1.0 / base ** (torch.arange(0, dim, 2).float() / dim))


def test_rope_refuses_a_scaled_model_and_a_shorter_context():
    with pytest.raises(BadInput, match="already has rope_type 'linear'"):
        scaled_rope({"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}, NATIVE, LONG, RopeType.yarn)
    with pytest.raises(BadInput, match="not longer than the model's 256 positions"):
        scaled_rope({"rope_type": "default", "rope_theta": 1.0}, NATIVE, 128, RopeType.linear)


def test_config_checks_and_max_length_follows_the_context():
    config = TrainConfig(data="d", out="o", context_length=LONG)
    assert config.max_length == LONG
    assert TrainConfig(data="d", out="o", context_length=LONG, max_length=512).max_length == 512
    with pytest.raises(ValueError, match="--rope-factor needs --context-length"):
        TrainConfig(data="d", out="o", rope_factor=2.0)
    with pytest.raises(ValueError, match="--trainable is for adapter methods"):
        TrainConfig(data="d", out="o", method="full", trainable=["embed"])


# --- S²-Attn --------------------------------------------------------------------------------------------------------------


def test_one_group_without_shift_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 48, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, None, group_size=48, shift=False), expected)


def visible_keys(group_size: int, length: int, heads: int = 4) -> torch.Tensor:
    """(heads, length, length) boolean: which keys each query of each head attends to. Queries and keys are 0, so
    attention is uniform over the allowed keys, and value j is the one-hot vector e_j."""
    q = k = torch.zeros(1, heads, length, length)
    v = torch.eye(length).expand(1, heads, length, length)
    return s2_attention(q, k, v, None, group_size=group_size)[0] > 0


def test_which_keys_each_query_of_each_head_sees():
    length, group = 16, 4
    seen = visible_keys(group, length)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    causal = j <= i
    plain = (i // group == j // group) & causal
    shifted_group = (torch.arange(length) - group // 2) % length // group  # after rolling by -G/2
    shifted = (shifted_group[:, None] == shifted_group[None, :]) & causal
    for head in (0, 1):
        assert torch.equal(seen[head], plain), head
    for head in (2, 3):
        assert torch.equal(seen[head], shifted), head
    # e.g. in the shifted heads query 5 sees keys 2..5: the group straddles plain groups 0 and 1
    assert seen[2, 5].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert seen[0, 5].nonzero().flatten().tolist() == [4, 5]


def test_causal_mask_holds_in_the_wrapped_group():
    """LongLoRA's roll puts tokens 0..G/2-1 after tokens L-G/2..L-1 in the last group of the shifted heads; no
    query may see a later key there (or anywhere)."""
    for length, group in ((16, 4), (12, 6), (10, 4)):  # 10: not a multiple of the group size
        seen = visible_keys(group, length)
        assert not torch.triu(seen, diagonal=1).any(), (length, group)
        assert seen[:, torch.arange(length), torch.arange(length)].all()  # every query sees itself


def _model_outputs(model_cls, config, ids, attention_mask=None):
    torch.manual_seed(0)
    model = model_cls(config).train()  # dropout is 0 in these configs: train mode only selects S²-Attn
    reference = model(input_ids=ids, attention_mask=attention_mask).logits
    model.set_attn_implementation(register(1.0))
    return model, reference, model(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("model_cls,config_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_one_group_with_shift_is_full_attention_in_the_model(model_cls, config_cls):
    """group_size_ratio 1: the shifted heads' single group is the whole sequence, gathered at the tokens' own
    positions, so S²-Attn must equal the model's own sdpa attention (Llama, and Qwen2 with grouped KV heads).
    Row 1 is left-padded: its tokens must not see the padding, which only the registered mask function tells the
    attention (an unregistered name gets attention_mask=None)."""
    ids = torch.randint(0, 128, (2, 40))
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, :10] = 0
    model, reference, output = _model_outputs(model_cls, tiny_config(config_cls), ids, padding)
    torch.testing.assert_close(output[0], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output[1, 10:], reference[1, 10:], atol=1e-5, rtol=1e-5)


def test_s2_attn_is_for_training_only():
    ids = torch.randint(0, 128, (1, 64))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).train()
    reference = model(input_ids=ids).logits
    model.set_attn_implementation(register(0.25))
    sparse = model(input_ids=ids).logits
    assert (sparse - reference).abs().max() > 1e-3  # four groups: a different attention while training
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reference)
    register(0.25)
    padded = torch.ones(1, 64, dtype=torch.long)
    padded[0, 20:] = 0  # groups of padding only must not turn into NaN
    assert torch.isfinite(model.train()(input_ids=ids, attention_mask=padded).logits).all()
