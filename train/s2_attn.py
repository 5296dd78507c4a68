"""Shifted sparse attention (S²-Attn) of LongLoRA, as an attention function registered with transformers.

    datagen train --data DIR --context-length 8192 --s2-attn --trainable embed,norm --out runs/long

LongLoRA (Chen et al. 2024, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models", section 3.2;
dvlab-research/LongLoRA llama_attn_replace.py, forward_flashattn): the sequence is split into groups of a quarter of
its length and attention runs causally within each group only; half of the heads use groups shifted by half a
group, so information flows between neighbouring groups. It is a training-time approximation: evaluation and
inference use full attention, which the model code then gets unchanged (a module in eval mode is passed to
transformers' own sdpa function here).

Memory is linear in the length: each group is one causal SDPA call (`is_causal=True`, torch's fused kernel on
CPU and GPU, no mask tensor), the groups of equal size batched into one call. No length x length tensor is built,
by this module or by transformers: the mask function registered for "s2_attn" keeps the 2D padding mask and the
arguments it was called with (`S2Mask`), and builds transformers' sdpa mask only when full attention needs one
(eval mode, or a cache).

Groups, as LongLoRA's flash path cuts them (cu_q_lens in forward_flashattn): the first half of the heads
(heads // 2 of them) attends within [0, G), [G, 2G), ...; the other half within [0, G/2), [G/2, 3G/2), ...,
[L - G/2, L): the shifted groups are split at both ends of the sequence, so no query sees a later key and nothing
wraps around. A last group shorter than G (a length that is not a multiple of G) is attended as it is (LongLoRA
raises instead). LongLoRA's non-flash path (forward_noflashattn) differs in one group: it rolls the shifted heads
by half a group, so its last group holds the last G/2 tokens followed by the first G/2, masked causally by slot.
The last G/2 tokens then see only each other, as here; the first G/2 tokens see each other and also the last G/2
tokens of the sequence, keys later than the query: a causal leak, which the flash path (and this module) does not
have. Every other group is the same in both paths.

Packed documents and padding: a new document starts where the position ids do not go up by one (TRL's
padding-free batches, `position_ids` restarting at 0; transformers' find_packed_sequence_indices reads them the
same way) and where a run of real tokens follows padding (left padding). The groups are then cut at those starts
too, so no token sees another document or the padding before it, exactly as transformers' own sdpa mask for the
same batch. Right padding needs no cut: no real token sees a later key.

Models whose attention adds a logit softcap (Gemma 2) or attention sinks (`s_aux`, gpt-oss) are refused: plain
SDPA groups would silently drop them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

S2_ATTN = "s2_attn"
"""The attn_implementation name under which S²-Attn and its mask are registered."""


# --- The attention (pure torch) ------------------------------------------------------------------------------------------


def s2_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_size: int, *,
                 starts: torch.Tensor | None = None, shift: bool = True, scaling: float | None = None,
                 dropout: float = 0.0) -> torch.Tensor:  # fmt: skip
    """S²-Attn over query, key, value of shape (batch, heads, length, head_dim), key and value with as many heads
    as the query. starts: boolean (batch, length), True where a new document (or the real tokens after padding)
    begins, or None for one document per row. Returns (batch, heads, length, head_dim)."""
    length = query.shape[2]
    half = query.shape[1] // 2 if shift else query.shape[1]
    attend = partial(_causal_runs, starts=starts, scaling=scaling, dropout=dropout)
    plain = attend(query[:, :half], key[:, :half], value[:, :half], _group_cuts(length, group_size, 0))
    if not shift:
        return plain
    # LongLoRA's shift: the other heads' groups start half a group later (its flash path's cu_q_lens)
    shifted = attend(query[:, half:], key[:, half:], value[:, half:], _group_cuts(length, group_size, group_size // 2))
    return torch.cat([plain, shifted], dim=1)


def _group_cuts(length: int, group_size: int, offset: int) -> list[int]:
    """Where groups begin and the sequence ends: [0, offset, offset + G, ..., length] (offset 0: [0, G, ...])."""
    return sorted({0, *range(offset, length, group_size), length})


def _causal_runs(query, key, value, cuts: list[int], *, starts, scaling, dropout) -> torch.Tensor:
    """Causal attention within each run [cuts[i], cuts[i+1]) and, where `starts` marks documents, within each
    document's part of a run. Runs of equal length go through SDPA as one batch."""
    if starts is not None and bool(starts[:, 1:].any()):
        return torch.cat([_causal_runs_of_row(query[row : row + 1], key[row : row + 1], value[row : row + 1],
                                              _cuts_of_row(cuts, starts[row]), scaling, dropout)
                          for row in range(query.shape[0])])  # fmt: skip
    return _causal_runs_of_row(query, key, value, cuts, scaling, dropout)


def _cuts_of_row(cuts: list[int], starts: torch.Tensor) -> list[int]:
    return sorted(set(cuts) | set(starts.nonzero().flatten().tolist()))


def _causal_runs_of_row(query, key, value, cuts: list[int], scaling, dropout) -> torch.Tensor:
    batch, heads, length, head_dim = query.shape
    out = query.new_empty(batch, heads, length, head_dim)
    spans = list(zip(cuts[:-1], cuts[1:]))
    by_size: dict[int, list[int]] = {}
    for begin, end in spans:
        by_size.setdefault(end - begin, []).append(begin)
    for size, begins in by_size.items():
        if size == 1:  # a run of one token attends to itself only
            index = torch.tensor(begins, device=query.device)
            out[:, :, index] = value[:, :, index]
            continue
        if len(begins) > 1 and begins == list(range(begins[0], begins[0] + size * len(begins), size)):
            # consecutive runs of one size: a view of (batch x runs) sequences of `size` tokens, one SDPA call
            first, count = begins[0], len(begins)

            def runs(states):
                part = states[:, :, first : first + size * count].unflatten(2, (count, size))
                return part.transpose(1, 2).reshape(batch * count, heads, size, head_dim)

            result = _sdpa(runs(query), runs(key), runs(value), scaling, dropout)
            out[:, :, first : first + size * count] = result.view(batch, count, heads, size, head_dim).transpose(1, 2).flatten(2, 3)
        else:
            for begin in begins:
                end = begin + size
                out[:, :, begin:end] = _sdpa(query[:, :, begin:end], key[:, :, begin:end], value[:, :, begin:end], scaling, dropout)
    return out


def _sdpa(query, key, value, scaling, dropout) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)


def document_starts(position_ids: torch.Tensor | None, padding: torch.Tensor | None, batch: int,
                    length: int) -> torch.Tensor | None:  # fmt: skip
    """(batch, length) boolean, True where a document begins after the first token: position ids that do not go
    up by one (packed documents) and real tokens that follow padding (left padding); None when there is none."""
    device = position_ids.device if position_ids is not None else padding.device if padding is not None else None
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if position_ids is not None:
        positions = position_ids.expand(batch, -1)[:, -length:]
        starts[:, 1:] |= positions[:, 1:] != positions[:, :-1] + 1
    if padding is not None:
        padding = padding[:, -length:].bool()
        starts[:, 1:] |= padding[:, 1:] & ~padding[:, :-1]
    return starts if bool(starts[:, 1:].any()) else None


# --- transformers' interfaces ---------------------------------------------------------------------------------------------


@dataclass
class S2Mask:
    """What transformers' mask interface passed for "s2_attn": the 2D padding mask (None: no padding) and the
    arguments to build its sdpa mask from, which only full attention needs."""

    padding: torch.Tensor | None
    arguments: dict[str, Any]
    _dense: Any = field(default=None, repr=False)

    def dense(self) -> torch.Tensor | None:
        """transformers' sdpa mask for these arguments (None for plain causal attention), built once."""
        from transformers.masking_utils import sdpa_mask

        if self._dense is None:
            self._dense = (sdpa_mask(**self.arguments),)
        return self._dense[0]


def s2_mask(**kwargs) -> S2Mask:
    """The mask function registered for "s2_attn": keeps its arguments, builds nothing."""
    padding = kwargs.get("attention_mask")
    if padding is not None:
        padding = padding[:, -kwargs["kv_length"] :]
        padding = None if bool(padding.all()) else padding
    return S2Mask(padding, kwargs)


def s2_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: S2Mask | torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         *, group_size_ratio: float, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """The AttentionInterface function: S²-Attn while the module trains on a whole sequence, transformers' sdpa
    attention otherwise (evaluation, generation with a cache). Returns (batch, length, heads, head_dim)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"S²-Attn does not support attention with {name} ({type(module).__name__}); train without --s2-attn")
    if not module.training or query.shape[2] != key.shape[2]:
        mask = attention_mask.dense() if isinstance(attention_mask, S2Mask) else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None and not isinstance(attention_mask, S2Mask):
        raise ValueError("S²-Attn takes a 2D padding mask or position ids, not a prepared 4D attention mask")
    groups_of_kv = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups_of_kv), repeat_kv(value, groups_of_kv)
    batch, _, length, _ = query.shape
    group_size = max(2, math.ceil(length * group_size_ratio))
    padding = attention_mask.padding if attention_mask is not None else None
    starts = document_starts(kwargs.get("position_ids"), padding, batch, length)
    out = s2_attention(query, key, value, group_size, starts=starts, scaling=scaling, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


def register(group_size_ratio: float) -> str:
    """Register S²-Attn with this group size ratio (TrainConfig.s2_group_size_ratio: LongLoRA's 1/4) and its mask
    with transformers under S2_ATTN (a later call replaces the ratio); returns the name for `attn_implementation`.
    The mask function must be registered too: an implementation unknown to the mask interface gets
    attention_mask=None from transformers (masking_utils.py, _preprocess_mask_arguments), and padding is lost."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(S2_ATTN, partial(s2_attention_forward, group_size_ratio=group_size_ratio))
    AttentionMaskInterface.register(S2_ATTN, s2_mask)
    return S2_ATTN


def check_model_config(config) -> None:
    """Refuse, before training, a model whose attention S²-Attn's plain SDPA groups would change silently."""
    from datagen.errors import BadInput

    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise BadInput(f"--s2-attn: {text.model_type} caps its attention logits (attn_logit_softcapping); S²-Attn would drop the cap")
    if text.model_type in ("gpt_oss",):
        raise BadInput(f"--s2-attn: {text.model_type} uses attention sinks (s_aux); S²-Attn would drop them")
