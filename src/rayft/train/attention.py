"""Attention over packed rows without a dense mask: each packed sample attends only to itself.

Stock attention runs a packed row of T tokens as one T x T problem under a block-diagonal mask:
the work and memory grow with T^2 though each sample only needs its own L^2, and on CPU the
masked sdpa kernel is slow (its backward took a quarter of a SmolLM2 LoRA step; see README).
Here each packed sample attends only to itself, and no mask is built at all:
- on a CUDA device in bf16 or fp16, one call of the flash kernel's variable-length attention
  (torch.nn.attention.varlen, torch >= 2.10) takes every sample of the batch by its offsets, as
  flash-attn's varlen function does for LLaMA-Factory's neat packing;
- elsewhere (the CPU, fp32, attention dropout) the samples are gathered into buckets of similar
  length, each bucket runs one plain causal attention, and the outputs are put back in place.

The layout (which token goes where) depends only on the batch's position ids: it is built once
per batch (`PackedLayout.of`) and handed to every layer through the model's keyword arguments.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

ATTENTION_NAME = "rayft_packed"
# Model types whose attention is plain causal softmax attention (no sliding window, soft-capping
# or sinks) over rotary queries/keys: what this function computes.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite"})
# A bucket whose scores (segments x heads x L x L) stay under this many elements runs as plain
# matmul-softmax-matmul (on CPU ~4x faster than the fused kernel at these sizes); a bigger one
# runs the fused kernel, which never holds the scores.
_MATH_MAX_SCORES = 1 << 23
# Whether a CUDA bf16/fp16 forward may take the flash kernel's variable-length attention (a switch
# for benchmarks/train_step.py to time the buckets against it on a GPU).
USE_FLASH_VARLEN = True
# The largest head size it takes here: above it the flash backward's limits depend on the GPU.
FLASH_VARLEN_MAX_HEAD_DIM = 128


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory and without blocking: a copy from
    pageable memory synchronizes the stream, so the host would wait for every queued kernel."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class Bucket:
    gather: torch.Tensor  # (segments * length,) flat token index for every slot; padding slots repeat one
    segments: int
    length: int


@dataclass
class PackedLayout:
    begin: torch.Tensor  # (segments,) on the CPU: each segment's first token in the flattened batch
    lengths: torch.Tensor  # (segments,) on the CPU
    device: torch.device

    @classmethod
    def of(cls, position_ids: torch.Tensor, device: torch.device | None = None) -> "PackedLayout":
        """Segments start where the position does not continue the previous one (a packed sample
        restarts at 0; a row's right padding is a segment of its own, computed and ignored).
        `device`: where the attention runs, if not where `position_ids` are (a host copy of the
        batch's, read without waiting for the device)."""
        batch, tokens = position_ids.shape
        flat = position_ids.reshape(-1).cpu()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1] + 1
        starts[::tokens] = True  # a new row always starts a segment
        begin = torch.nonzero(starts).flatten()
        return cls(begin, torch.diff(begin, append=torch.tensor([flat.numel()])), device or position_ids.device)

    @cached_property
    def offsets(self) -> tuple[torch.Tensor, int]:
        """(each segment's first token and, last, the token count: int32 on the device; the
        longest segment's length): the variable-length kernel's cu_seqlens and max_seqlen."""
        total = self.begin.new_tensor([int(self.begin[-1] + self.lengths[-1])])
        return host_to_device(torch.cat([self.begin, total]).to(torch.int32), self.device), int(self.lengths.max())

    @cached_property
    def buckets(self) -> list[Bucket]:
        return self._bucketed[0]

    @cached_property
    def scatter(self) -> torch.Tensor:
        """(batch * tokens,) each token's slot in the buckets' outputs laid end to end."""
        return self._bucketed[1]

    @cached_property
    def _bucketed(self) -> tuple[list[Bucket], torch.Tensor]:
        begin, lengths = self.begin, self.lengths
        # power-of-two buckets (at least 16): padding at most doubles a segment's length
        sizes = torch.clamp(lengths, min=16)
        bucket_of = torch.ceil(torch.log2(sizes.double())).long()
        scatter = torch.empty(int(begin[-1] + lengths[-1]), dtype=torch.long)
        buckets, offset = [], 0
        for exponent in torch.unique(bucket_of).tolist():
            members = torch.nonzero(bucket_of == exponent).flatten()
            seg_begin, seg_len = begin[members], lengths[members]
            length = int(seg_len.max())
            slot = torch.arange(length)[None, :]
            real = slot < seg_len[:, None]
            # slots past a segment's end point at its first token: they come after every real
            # token of the segment, so causal attention never lets a real token see them
            gather = (seg_begin[:, None] + torch.where(real, slot, 0)).reshape(-1)
            token = seg_begin[:, None] + slot
            scatter[token[real]] = offset + (torch.arange(len(members))[:, None] * length + slot)[real]
            buckets.append(Bucket(host_to_device(gather, self.device), len(members), length))
            offset += len(members) * length
        return buckets, host_to_device(scatter, self.device)


@functools.cache
def _varlen_kernel():
    """torch's variable-length flash attention and the keyword names its version takes, or None
    (torch < 2.10). Its signature moved: 2.10 takes is_causal and no scale, 2.11 window_size and
    scale, 2.12 also enable_gqa (and then requires it for grouped-query shapes)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen_call(query, key, value, scaling: float, dropout: float, training: bool
                       ) -> tuple[dict, torch.dtype] | None:
    """(the keyword arguments of a causal varlen_attn call, the dtype to run it in) for these
    inputs, or None where the flash kernel does not run them: not CUDA (nor ROCm, unchecked),
    not half precision, dropout, a head size over FLASH_VARLEN_MAX_HEAD_DIM,
    a GPU before Ampere, or a scale this torch's varlen_attn cannot take.

    Under autocast the dtype is autocast's: there the rotary embedding hands the queries and keys
    over in the residual stream's fp32 and the values in bf16, and sdpa, which autocast casts,
    would run all three in bf16. The custom op is not autocast's, so the call casts them itself."""
    kernel = _varlen_kernel()
    head_dim = query.shape[-1]
    if (not USE_FLASH_VARLEN or kernel is None or not query.is_cuda or torch.version.hip
            or (dropout and training) or head_dim % 8 or head_dim > FLASH_VARLEN_MAX_HEAD_DIM):
        return None
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    elif query.dtype == key.dtype == value.dtype:
        dtype = query.dtype
    else:
        return None
    if dtype not in (torch.float16, torch.bfloat16) or torch.cuda.get_device_capability(query.device) < (8, 0):
        return None
    arguments = causal_varlen_arguments(kernel[1], scaling, head_dim, grouped=key.shape[1] != query.shape[1])
    return None if arguments is None else (arguments, dtype)


def causal_varlen_arguments(names: frozenset, scaling: float, head_dim: int, grouped: bool) -> dict | None:
    """varlen_attn's keyword arguments for causal attention at this scale, given the names its
    signature takes; None if it cannot take this scale."""
    arguments = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
    if "scale" in names:
        arguments["scale"] = scaling
    elif scaling != head_dim ** -0.5:
        return None
    if "enable_gqa" in names:
        arguments["enable_gqa"] = grouped
    return arguments


def _causal_attention(q, k, v, scaling: float, dropout: float, training: bool) -> torch.Tensor:
    """q (S, KVH, G, L, D), k/v (S, KVH, 1, L, D) -> (S, KVH, G, L, D)."""
    segments, kv_heads, groups, length, head_dim = q.shape
    if q.device.type == "cpu" and segments * kv_heads * groups * length * length <= _MATH_MAX_SCORES:
        # A query group's heads share their key and value: laid one under another as rows of one
        # (G * L) x D matrix they multiply the group's keys in one product, so neither k nor v
        # is copied out G times for a broadcast matmul (the same dot products; ~3-7% of a step)
        rows = (q * scaling).reshape(segments, kv_heads, groups * length, head_dim)  # q is smaller than the scores (L > D)
        scores = torch.matmul(rows, k.squeeze(2).transpose(-1, -2))
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        # matmul's backward does not need its output
        scores.view(segments, kv_heads, groups, length, length).masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=dropout, training=training)
        return torch.matmul(probs, v.squeeze(2)).view(segments, kv_heads, groups, length, head_dim)
    shape = (segments, kv_heads * groups, length, -1)
    out = F.scaled_dot_product_attention(
        q.reshape(shape), k.expand(-1, -1, groups, -1, -1).reshape(shape), v.expand(-1, -1, groups, -1, -1).reshape(shape),
        is_causal=True, dropout_p=dropout if training else 0.0, scale=scaling)
    return out.reshape(segments, kv_heads, groups, length, -1)


@torch.compiler.disable  # the layout is data (a list of buckets): a compiled layer calls this eagerly
def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             packed_layout: PackedLayout | None = None, position_ids=None, **kwargs):
    """The transformers attention interface: query (B, H, T, D), key/value (B, KVH, T, D) ->
    (B, T, H, D). Used for training and evaluation forwards only (no KV cache, no mask)."""
    if attention_mask is not None or kwargs.get("cache") is not None:
        raise ValueError(f"{ATTENTION_NAME} attention is for training forwards: no attention mask, no KV cache")
    batch, heads, tokens, head_dim = query.shape
    if packed_layout is None:
        if position_ids is None:
            raise ValueError(f"{ATTENTION_NAME} attention needs position_ids or a packed_layout")
        packed_layout = PackedLayout.of(position_ids.expand(batch, -1))  # transformers may pass (1, T)
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = head_dim ** -0.5 if scaling is None else scaling
    varlen = _flash_varlen_call(query, key, value, scaling, dropout, module.training)
    if varlen is not None:
        arguments, dtype = varlen
        # (B, H, T, D) is a transposed view of the projections' (B, T, H, D): these are views
        # (but for the cast to the compute dtype)
        flat = [x.transpose(1, 2).to(dtype).reshape(batch * tokens, x.shape[1], head_dim) for x in (query, key, value)]
        cu_seqlens, max_length = packed_layout.offsets
        out = _varlen_kernel()[0](*flat, cu_seqlens, cu_seqlens, max_length, max_length, **arguments)
        return out.view(batch, tokens, heads, head_dim), None
    q_flat = query.transpose(1, 2).reshape(batch * tokens, kv_heads, groups, head_dim)
    k_flat = key.transpose(1, 2).reshape(batch * tokens, kv_heads, 1, head_dim)
    v_flat = value.transpose(1, 2).reshape(batch * tokens, kv_heads, 1, head_dim)
    outputs = []
    for bucket in packed_layout.buckets:
        s, n = bucket.segments, bucket.length

        def seg(x):  # (S * L, KVH, G, D) -> (S, KVH, G, L, D)
            return x.index_select(0, bucket.gather).view(s, n, *x.shape[1:]).permute(0, 2, 3, 1, 4)

        out = _causal_attention(seg(q_flat), seg(k_flat), seg(v_flat), scaling, dropout, module.training)
        outputs.append(out.permute(0, 3, 1, 2, 4).reshape(s * n, heads, head_dim))
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out.index_select(0, packed_layout.scatter).view(batch, tokens, heads, head_dim), None


def register() -> str:
    """Make the function known to transformers under ATTENTION_NAME (no mask function is
    registered with it, so transformers builds no mask); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    return ATTENTION_NAME


def supports(model_config) -> bool:
    """Whether this attention computes what the model's own does."""
    return (model_config.model_type in SUPPORTED_MODEL_TYPES
            and not getattr(model_config, "sliding_window", None)
            and not getattr(model_config, "attn_logit_softcapping", None))
