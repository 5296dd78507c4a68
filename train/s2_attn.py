"""Shifted sparse attention (S²-Attn) of LongLoRA, as an attention function registered with transformers.

    datagen train --data DIR --context-length 8192 --s2-attn --trainable embed,norm --out runs/long

LongLoRA (Chen et al. 2024, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models", section 3.2,
and its llama_attn_replace.py, forward_noflashattn): the sequence is split into groups of a quarter of its
length; attention runs within each group only; half of the heads see the tokens shifted by half a group (after
RoPE), so information flows between neighbouring groups; the shifted heads' outputs are shifted back. The cost of
the attention is linear in the length for a fixed group size. It is a training-time approximation: evaluation
and inference use full attention, which the model code then gets unchanged (a module in eval mode is passed to
transformers' own sdpa function here).

Registered under the name "s2_attn" with `AttentionInterface` (the attention itself) and with
`AttentionMaskInterface` (its mask): an implementation unknown to the mask interface gets attention_mask=None
from transformers (masking_utils.py, _preprocess_mask_arguments), and causal masking would be silently lost.
The mask function is transformers' sdpa mask, always materialized (never skipped for is_causal), so padding and
packed sequences (position ids restarting at 0) are in it; each group gathers its block of that mask.
No model code is patched: any model whose attention goes through the interface (Llama, Qwen2, Mistral, SmolLM2...).

Deviation from LongLoRA, named: LongLoRA rolls the shifted heads by half a group and masks each group causally by
slot, so in the last group the first half-group of the sequence (rolled to the end) sees the sequence's last
tokens, a causal leak. Here each group's mask is gathered at the tokens' original positions, so no query sees a
later key; with one group (group_size_ratio 1) S²-Attn is then exactly full causal attention. A sequence whose
length is not a multiple of the group size is padded with masked slots up to one (LongLoRA raises instead).
"""

from __future__ import annotations

import math
from functools import partial
import torch

S2_ATTN = "s2_attn"
"""The attn_implementation name under which S²-Attn and its mask are registered."""

def s2_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 group_size: int, *, shift: bool = True, scaling: float | None = None,
                 dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
    """S²-Attn over query, key, value of shape (batch, heads, length, head_dim), key and value with as many heads
    as the query. mask: boolean (batch or 1, 1, length, length), True where a query may see a key, or None for
    plain causal attention. Returns (batch, heads, length, head_dim)."""
    batch, heads, length, head_dim = query.shape
    padded = math.ceil(length / group_size) * group_size
    allowed = _full_mask(mask, batch, length, padded, query.device)
    half = heads // 2 if shift else heads
    outputs = [_grouped_attention(query[:, :half], key[:, :half], value[:, :half], allowed, group_size, 0, scaling, dropout)]
    if shift:
        # LongLoRA's shift: the second half of the heads sees the sequence rolled back by half a group
        outputs.append(_grouped_attention(query[:, half:], key[:, half:], value[:, half:], allowed, group_size,
                                          group_size // 2, scaling, dropout))  # fmt: skip
    return torch.cat(outputs, dim=1)[:, :, :length]


def _grouped_attention(query, key, value, allowed, group_size: int, shift: int, scaling, dropout) -> torch.Tensor:
    """Attention within consecutive groups of the sequence rolled by -shift (slot j holds position j + shift),
    each group masked by its block of `allowed` at the tokens' original positions; returned in position order."""
    batch, heads, length, head_dim = query.shape
    padded = allowed.shape[-1]
    groups = padded // group_size

    def grouped(states: torch.Tensor) -> torch.Tensor:
        states = torch.nn.functional.pad(states, (0, 0, 0, padded - length)).roll(-shift, dims=2)
        return states.view(batch, heads, groups, group_size, head_dim).transpose(1, 2).reshape(-1, heads, group_size, head_dim)

    rolled = allowed.roll((-shift, -shift), dims=(1, 2)) if shift else allowed
    # the diagonal blocks, (batch, groups, G, G)
    blocks = rolled.view(batch, groups, group_size, groups, group_size).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    blocks = blocks | torch.eye(group_size, dtype=torch.bool, device=query.device)  # padding-only rows stay finite
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped(query), grouped(key), grouped(value), attn_mask=blocks.reshape(-1, 1, group_size, group_size),
        dropout_p=dropout, scale=scaling,
    )  # fmt: skip
    out = out.view(batch, groups, heads, group_size, head_dim).transpose(1, 2).reshape(batch, heads, padded, head_dim)
    return out.roll(shift, dims=2)


def _full_mask(mask: torch.Tensor | None, batch: int, length: int, padded: int, device) -> torch.Tensor:
    """(batch, padded, padded) boolean: the given mask (or causal), with the padding slots masked out."""
    allowed = torch.zeros(batch, padded, padded, dtype=torch.bool, device=device)
    if mask is None:
        allowed[:, :length, :length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    else:
        allowed[:, :length, :length] = mask[:, 0, :length, :length]
    return allowed


def s2_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         *, group_size_ratio: float, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """The AttentionInterface function: S²-Attn while the module trains on a whole sequence, transformers' sdpa
    attention otherwise (evaluation, generation with a cache). Returns (batch, length, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not module.training or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups_of_kv = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups_of_kv), repeat_kv(value, groups_of_kv)
    group_size = max(2, math.ceil(query.shape[2] * group_size_ratio))
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # an additive float mask: 0 where attention is allowed
    out = s2_attention(query, key, value, attention_mask, group_size, scaling=scaling, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


def register(group_size_ratio: float) -> str:
    """Register S²-Attn with this group size ratio (TrainConfig.s2_group_size_ratio: LongLoRA's 1/4) and its mask
    with transformers under S2_ATTN (a later call replaces the ratio); returns the name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(S2_ATTN, partial(s2_attention_forward, group_size_ratio=group_size_ratio))
    AttentionMaskInterface.register(S2_ATTN, s2_mask)
    return S2_ATTN


def s2_mask(*args, **kwargs) -> torch.Tensor:
    """transformers' sdpa mask, always built: sdpa may return None for a plain causal batch and rely on
    is_causal, but the groups need the mask's blocks."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)
