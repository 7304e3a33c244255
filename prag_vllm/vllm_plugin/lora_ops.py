"""Grouped multi-LoRA ops for vLLM's CPU punica wrapper (same signatures as
``vllm.lora.ops.torch_ops``).

vLLM's CPU ops gather ``weights[lora_indices]`` -- a full copy of an adapter matrix for
EVERY token -- and then run a batched einsum. They also index slot -1 (a token without
an adapter) as the LAST slot, so a base-model request batched with adapter requests is
computed with somebody else's adapter. Here tokens are grouped by slot (at most
max_loras groups), each group does one matmul on its gathered rows, and the result is
scattered back; tokens with slot -1 get exactly zero.

Only LoRA on embeddings and logits still calls these ops (linear layers go through
:mod:`.punica`'s plan). They group by slot value rather than by the plan's runs: their
weights can be vocabulary-sized, and one matmul per distinct slot never copies them,
where the plan's ``gather`` would copy a slot's weights for every decode token.
"""

from __future__ import annotations

import torch


def _slot_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, row indices) per adapter slot present; rows None means 'all rows'."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first < 0 else [(first, None)]
    return [(int(s), (indices == s).nonzero().squeeze(1)) for s in torch.unique(indices).tolist() if s >= 0]


def _grouped_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = inputs[t] @ weights[indices[t]].T``, and 0 where ``indices[t] < 0``."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    groups = _slot_groups(indices)
    if len(groups) == 1 and groups[0][1] is None:
        return x @ weights[groups[0][0]].to(dtype).T
    out = torch.zeros((x.shape[0], weights.shape[1]), dtype=dtype, device=x.device)
    for slot, rows in groups:
        out.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _explode(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)
