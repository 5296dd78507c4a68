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
from train.s2_attn import document_starts, register, s2_attention

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


def test_dynamic_is_refused_naming_yarn_and_linear():
    """vLLM's dynamic NTK is not transformers' (a fixed base, no cache rows past the original length): refused
    before any training, in one line that names the modes vLLM serves as transformers trains them."""
    with pytest.raises(BadInput, match="--rope dynamic") as refused:
        scaled(RopeType.dynamic)
    assert "\n" not in str(refused.value) and "--rope yarn" in str(refused.value) and "--rope linear" in str(refused.value)


def test_transformers_backend_context_length_is_the_scaled_length():
    from datagen.backends.transformers_backend import context_length

    assert context_length(scaled(RopeType.linear)) == LONG
    assert context_length(scaled(RopeType.yarn)) == LONG
    assert context_length(tiny_config()) == NATIVE


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


def dense_reference(q, k, v, group: int, documents: torch.Tensor | None = None) -> torch.Tensor:
    """S²-Attn written independently of train/s2_attn.py: a full (length x length) mask per head from the group
    each position falls in (plain heads: position // G; shifted heads: (position + G/2) // G, LongLoRA's flash
    path), causal, and the same document; then softmax(q k^T / sqrt(d)) v."""
    batch, heads, length, dim = q.shape
    position = torch.arange(length)
    documents = torch.zeros(batch, length, dtype=torch.long) if documents is None else documents
    out = torch.empty_like(q)
    for head in range(heads):
        groups = position // group if head < heads // 2 else (position + group // 2) // group
        for row in range(batch):
            doc = documents[row]
            allowed = (groups[:, None] == groups[None, :]) & (position[None, :] <= position[:, None]) & (doc[:, None] == doc[None, :])
            scores = (q[row, head] @ k[row, head].T) / math.sqrt(dim)
            out[row, head] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[row, head]
    return out


@pytest.mark.parametrize("heads,length,group", [(4, 48, 12), (5, 50, 12), (2, 16, 4), (3, 10, 4), (4, 33, 8)])
def test_s2_attention_matches_the_dense_reference(heads, length, group):
    """Odd head counts, lengths that are not a multiple of the group, groups of one size and of several."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, length, 8, dtype=torch.float64) for _ in range(3))
    got = s2_attention(q, k, v, group)
    assert (got - dense_reference(q, k, v, group)).abs().max() < 1e-6


def test_packed_documents_match_the_dense_reference():
    """Documents start where the position ids restart (TRL's padding-free batches); no token sees another
    document, in any group of either half of the heads."""
    torch.manual_seed(1)
    length, group = 40, 12
    q, k, v = (torch.randn(2, 4, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    position_ids = torch.tensor([[*range(7), *range(20), *range(13)], [*range(1), *range(30), *range(1), *range(8)]])
    starts = document_starts(position_ids, None, 2, length)
    documents = starts.long().cumsum(-1)
    assert documents[0].tolist() == [0] * 7 + [1] * 20 + [2] * 13
    got = s2_attention(q, k, v, group, starts=starts)
    expected = dense_reference(q, k, v, group, documents)
    assert (got - expected).abs().max() < 1e-6
    # and the gradients (training is what S²-Attn is for)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    assert max((a - b).abs().max() for a, b in zip(grads, expected_grads)) < 1e-6


def test_one_group_without_shift_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 48, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, group_size=48, shift=False), expected)


def visible_keys(group_size: int, length: int, heads: int = 4) -> torch.Tensor:
    """(heads, length, length) boolean: which keys each query of each head attends to. Queries and keys are 0, so
    attention is uniform over the allowed keys, and value j is the one-hot vector e_j."""
    q = k = torch.zeros(1, heads, length, length)
    v = torch.eye(length).expand(1, heads, length, length)
    return s2_attention(q, k, v, group_size=group_size)[0] > 0


def test_which_keys_each_query_of_each_head_sees():
    length, group = 16, 4
    seen = visible_keys(group, length)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    causal = j <= i
    plain = (i // group == j // group) & causal
    shifted = ((i + group // 2) // group == (j + group // 2) // group) & causal
    for head in (0, 1):
        assert torch.equal(seen[head], plain), head
    for head in (2, 3):
        assert torch.equal(seen[head], shifted), head
    # e.g. in the shifted heads query 5 sees keys 2..5: the group straddles plain groups 0 and 1
    assert seen[2, 5].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert seen[0, 5].nonzero().flatten().tolist() == [4, 5]
    # the shifted heads' groups are split at both ends (LongLoRA's flash path): nothing wraps around
    assert seen[2, 15].nonzero().flatten().tolist() == [14, 15]
    assert seen[2, 1].nonzero().flatten().tolist() == [0, 1]


def test_causal_mask_holds_everywhere():
    for length, group in ((16, 4), (12, 6), (10, 4)):  # 10: not a multiple of the group size
        seen = visible_keys(group, length)
        assert not torch.triu(seen, diagonal=1).any(), (length, group)
        assert seen[:, torch.arange(length), torch.arange(length)].all()  # every query sees itself


def reference_mask(heads: int, length: int, group: int, documents: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, length) boolean, built independently like dense_reference: S²-Attn's pattern per
    head, same document, causal, and no padded key."""
    position = torch.arange(length)
    causal = position[None, :] <= position[:, None]
    masks = []
    for head in range(heads):
        groups = position // group if head < heads // 2 else (position + group // 2) // group
        masks.append((groups[:, None] == groups[None, :]) & causal)
    pattern = torch.stack(masks)[None]
    same_document = documents[:, None, :, None] == documents[:, None, None, :]
    return pattern & same_document & real[:, None, None, :].bool() | torch.eye(length, dtype=torch.bool)


@pytest.mark.parametrize("model_cls,config_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)])
def test_s2_attn_in_the_model_matches_the_reference_mask(model_cls, config_cls):
    """The registered S²-Attn (group of a quarter) inside Llama, and Qwen2 with grouped KV heads, against the
    model's own sdpa attention given the reference per-head mask as a 4D mask. Row 1 is left-padded: its tokens
    must not see the padding, which only the registered mask function tells the attention (an unregistered name
    gets attention_mask=None). Then a padding-free packed row (position ids restarting, as TRL passes them)."""
    length = 48
    torch.manual_seed(0)
    model = model_cls(tiny_config(config_cls)).train()  # dropout is 0 in these configs: train mode selects S²-Attn
    heads = model.config.num_attention_heads
    ids = torch.randint(0, 128, (2, length))
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, :10] = 0
    documents = torch.stack([torch.zeros(length, dtype=torch.long), (torch.arange(length) >= 10).long()])
    position_ids = (padding.cumsum(-1) - 1).clamp(min=0)
    reference = model(input_ids=ids, attention_mask=reference_mask(heads, length, 12, documents, padding), position_ids=position_ids).logits
    model.set_attn_implementation(register(0.25))
    output = model(input_ids=ids, attention_mask=padding, position_ids=position_ids).logits
    assert (output[0] - reference[0]).abs().max() < 1e-5
    assert (output[1, 10:] - reference[1, 10:]).abs().max() < 1e-5

    packed = torch.tensor([[*range(20), *range(28)]])
    documents = (torch.arange(length) >= 20).long()[None]
    output = model(input_ids=ids[:1], position_ids=packed).logits
    model.set_attn_implementation("sdpa")
    reference = model(input_ids=ids[:1], position_ids=packed,
                      attention_mask=reference_mask(heads, length, 12, documents, torch.ones(1, length))).logits  # fmt: skip
    assert (output - reference).abs().max() < 1e-5


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
    padded = torch.ones(1, 64, dtype=torch.long)
    padded[0, :20] = 0
    model.set_attn_implementation("sdpa")
    expected = model(input_ids=ids, attention_mask=padded).logits  # eval with padding: transformers' own mask
    model.set_attn_implementation(register(0.25))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=padded).logits[0, 20:], expected[0, 20:])
    assert torch.isfinite(model.train()(input_ids=ids, attention_mask=padded).logits).all()


def test_no_length_squared_tensor_in_training():
    """Every tensor saved for the backward pass is far below length x length elements (the largest are the
    logits, length x vocabulary): no mask, no score matrix (torch's fused causal kernel runs on each group).
    bench/long_context.py measures the peak memory."""
    length = 4096
    model = LlamaForCausalLM(tiny_config(max_position_embeddings=length)).train()
    model.set_attn_implementation(register(0.25))
    ids = torch.randint(0, 128, (1, length))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel()), t)[1], lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert max(sizes) < length * length / 16, max(sizes)


def test_s2_attn_refuses_softcap_and_sinks():
    from transformers import Gemma2Config

    from train.s2_attn import check_model_config

    with pytest.raises(BadInput, match="attn_logit_softcapping"):
        check_model_config(Gemma2Config())
    check_model_config(tiny_config())
    model = LlamaForCausalLM(tiny_config()).train()
    forward = __import__("transformers").AttentionInterface()[register(0.25)]
    q = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match="softcap"):
        forward(model.model.layers[0].self_attn, q, q, q, None, softcap=30.0)


def test_token_eval_loss_keeps_packed_documents_apart():
    """A padding-free batch (TRL's collator: position ids restarting per document) scores each document as if it
    were alone. With the model's cache on, transformers skips its packed-sequence mask and the second document
    would see the first."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.sft import token_eval_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    documents = [{"input_ids": torch.randint(0, 128, (n,)).tolist()} for n in (30, 20)]
    packed = token_eval_loss(model, documents, DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), batch_size=2)
    alone = []
    for document in documents:
        ids = torch.tensor([document["input_ids"]])
        with torch.no_grad():
            alone.append(float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1))
    # the collator masks each document's first label (position 0), so both count length - 1 tokens
    assert packed == pytest.approx(sum(alone) / (29 + 19), abs=1e-5)
