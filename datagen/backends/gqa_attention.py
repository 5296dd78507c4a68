"""transformers' SDPA attention, with grouped-query heads shared inside SDPA on the CPU even under a padding mask.

SmolLM2-135M (the embedded model) has 9 query heads over 3 key/value heads. transformers' `sdpa_attention_forward`
(transformers/integrations/sdpa_attention.py, `use_gqa_in_sdpa`) passes `enable_gqa=True` to torch's
`scaled_dot_product_attention` only when there is no attention mask; a padded batch has one, so it copies the
key/value cache 3 times per layer per generated token (`repeat_kv`). On a CPU that copy is most of a long
generation's time: a py-spy profile of `datagen alpaca` (5 requests, ~1.5k-token prompts, up to 1,024 new tokens)
spent 48% of its samples in `repeat_kv`. torch's CPU SDPA takes `enable_gqa` with a mask and gives the same result
(bit-identical in tests/test_transformers_backend.py), so on the CPU this function does that and hands every other
case (CUDA, no mask, paged caches, position bias) to transformers' own function unchanged.

Registered with transformers' `AttentionInterface` (the documented way to add an attention function), under
GQA_SDPA; the transformers backend loads models with it. bench/gqa_attention.py measures the gain.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GQA_SDPA = "datagen_gqa_sdpa"
"""The `attn_implementation` name."""


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("cache") is None and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
    if query.device.type != "cpu" or attention_mask is None or groups <= 1 or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    # with a mask transformers passes is_causal=False (the mask carries causality): the same here
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                              scale=scaling, is_causal=False, enable_gqa=True)  # fmt: skip
    return output.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers the function and SDPA's mask under GQA_SDPA (idempotent) and returns the `attn_implementation` name.
    The mask must be registered too: an implementation the mask interface does not know gets attention_mask=None
    (transformers/masking_utils.py, _preprocess_mask_arguments), and the padding would be attended."""
    AttentionInterface.register(GQA_SDPA, gqa_sdpa_forward)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    return GQA_SDPA
