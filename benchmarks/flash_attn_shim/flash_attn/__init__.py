"""flash_attn's training entry points over torch's own FlashAttention-2 kernel, for LLaMA-Factory's
side of rayft's GPU benchmark.

LLaMA-Factory runs neat packing through FlashAttention-2 (`flash_attn: fa2`): transformers then
hands each packed sample to `flash_attn_varlen_func` by its offsets. The flash-attn package is
only source on PyPI and its build needs the CUDA toolkit and a network, which the lent GPU host
has neither of. torch ships the same kernel (FlashAttention-2's code, vendored, behind
`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), which is also what rayft's packed
attention calls on a GPU. This package answers to the name flash-attn (transformers requires a
distribution of that name, version >= 2.3.3) and routes the two functions transformers calls in
training to that kernel, so both sides of the comparison run the same flash kernel.

On a CPU (a rehearsal of the wiring: torch's kernel is CUDA only) the same attention runs one
segment at a time through sdpa. Not covered, and refused when asked for: dropout, sliding
windows, soft-capping, deterministic backward, the KV cache (`flash_attn_with_kvcache`).
transformers passes a keyword only where the function's signature names it, so these are named
here in order to be refused rather than dropped; the benchmark's SmolLM2 training asks for none.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

__version__ = "2.8.3+torchvarlen"


def _kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _causal_segments(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal):
    """The reference: each segment's attention by itself (sdpa; keys and values repeated per group)."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (qa, qb), (ka, kb) in zip(zip(starts_q, starts_q[1:]), zip(starts_k, starts_k[1:])):
        segment = [x.transpose(0, 1)[None] for x in (q[qa:qb], k[ka:kb].repeat_interleave(groups, 1),
                                                     v[ka:kb].repeat_interleave(groups, 1))]
        out[qa:qb] = F.scaled_dot_product_attention(*segment, is_causal=causal, scale=scale)[0].transpose(0, 1)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """q (total_q, heads, dim), k/v (total_k, kv_heads, dim), the segments' offsets (int32,
    batch + 1) -> (total_q, heads, dim): each segment attends only to itself, as flash_attn's."""
    refused = {"attention dropout": dropout_p, "a sliding window": tuple(window_size) != (-1, -1),
               "soft-capping": softcap, "a deterministic backward": deterministic}
    for what, asked in refused.items():
        if asked:
            raise NotImplementedError(f"{what}: this stand-in over torch's varlen attention has none")
    if q.device.type == "cpu":
        return _causal_segments(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    kernel, names = _kernel()
    # the signature adaptation of rayft.train.attention.causal_varlen_arguments, non-causal too:
    # repeated, as this package runs in LF's environment, without rayft.
    # flash's window (-1, 0) is causal, (-1, -1) none; torch 2.10 took is_causal instead
    arguments = {"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in names else {"is_causal": causal}
    if "scale" in names:
        arguments["scale"] = softmax_scale
    elif softmax_scale is not None and softmax_scale != q.shape[-1] ** -0.5:
        raise NotImplementedError("this torch's varlen attention takes no softmax scale")
    if "enable_gqa" in names:  # torch >= 2.12 asks for it with fewer key-value heads
        arguments["enable_gqa"] = k.shape[1] != q.shape[1]
    return kernel(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), int(max_seqlen_q),
                  int(max_seqlen_k), **arguments)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    """q (batch, seq_q, heads, dim), k/v (batch, seq_k, kv_heads, dim): every row one segment."""
    batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    offsets = [torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device=q.device) for n in (seq_q, seq_k)]
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *offsets, seq_q, seq_k,
                                 dropout_p, softmax_scale, causal, window_size, softcap, deterministic)
    return out.view(batch, seq_q, *out.shape[1:])


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the KV cache: this stand-in covers training only")
