"""rayft's attention over packed rows equals attention under the block-diagonal causal mask."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rayft.train.attention import PackedLayout, packed_attention_forward


def block_diagonal_reference(q, k, v, position_ids):
    """sdpa with the mask transformers builds for packed rows: causal, and only within a sample."""
    restarts = torch.ones_like(position_ids, dtype=torch.bool)
    restarts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    sample = restarts.cumsum(1)
    tokens = position_ids.shape[1]
    mask = (sample[:, :, None] == sample[:, None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=mask[:, None])
    return out.transpose(1, 2)


class Attention(torch.nn.Module):
    pass


@pytest.mark.parametrize("math_max_scores", [1 << 23, 0])  # the CPU matmul path, and the fused kernel
def test_packed_attention_matches_the_block_diagonal_mask(monkeypatch, math_max_scores):
    import rayft.train.attention as attention

    monkeypatch.setattr(attention, "_MATH_MAX_SCORES", math_max_scores)
    torch.manual_seed(0)
    # row 0: samples of 5, 40, 3 and 16 tokens; row 1: one sample of 60
    # and 4 tokens of right padding (positions continue 0.. as collate writes them)
    position_ids = torch.tensor([list(range(5)) + list(range(40)) + list(range(3)) + list(range(16)),
                                 list(range(60)) + list(range(4))])
    batch, tokens = position_ids.shape
    heads, kv_heads, dim = 6, 2, 8  # grouped-query attention
    q = torch.randn(batch, heads, tokens, dim, requires_grad=True)
    k = torch.randn(batch, kv_heads, tokens, dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, tokens, dim, requires_grad=True)
    layout = PackedLayout.of(position_ids)
    assert sorted(b.length for b in layout.buckets) == [16, 60]  # 3, 4, 5, 16 in one bucket; 40 and 60 in another
    module = Attention().train()
    out, _ = packed_attention_forward(module, q, k, v, None, scaling=dim ** -0.5, packed_layout=layout)
    ref = block_diagonal_reference(q, k, v, position_ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_attention_refuses_a_mask_or_cache():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="training forwards"):
        packed_attention_forward(Attention(), q, q, q, torch.ones(1, 1, 4, 4), position_ids=torch.arange(4)[None])


def test_auto_picks_packed_attention_only_where_it_matches_the_model(tmp_path, tiny_model):
    from transformers import AutoConfig, MistralConfig

    from rayft.config import parse_config
    from rayft.errors import ConfigError
    from rayft.models.loading import attention_implementation
    from rayft.train.runner import check_method

    assert attention_implementation("auto", AutoConfig.from_pretrained(tiny_model)) == "rayft_packed"
    windowed = tmp_path / "windowed"
    MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, sliding_window=16).save_pretrained(windowed)
    assert attention_implementation("auto", AutoConfig.from_pretrained(windowed)) == "sdpa"
    cfg = parse_config({"name": "x", "output_dir": str(tmp_path / "out"), "data": {"train": "unused.jsonl"},
                        "train": {"attention": "packed"}})
    check_method(cfg, tiny_model)
    with pytest.raises(ConfigError, match="train.attention: packed does not fit model type 'mistral'"):
        check_method(cfg, windowed)


def reference_varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size,
                               enable_gqa):
    """varlen_attn's documented contract, on the CPU: each sequence of the flattened batch
    (cu_seq offsets) attends causally to itself alone; a query head h reads key/value head
    h // (H / H_kv)."""
    assert window_size == (-1, 0) and enable_gqa and cu_seq_q is cu_seq_k and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = (x[a:b].transpose(0, 1) for x in (query, key, value))
        outputs.append(F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                                      is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


def test_packed_attention_through_the_varlen_kernel_matches_the_block_diagonal_mask(monkeypatch):
    """The flash varlen path's glue (offsets from the position ids, the cast to the call's dtype,
    the flattening and the output's shape), with a CPU stand-in for the CUDA-only kernel;
    tests/test_gpu.py runs the kernel itself."""
    import rayft.train.attention as attention

    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (reference_varlen_attention, None))
    monkeypatch.setattr(attention, "_flash_varlen_call", lambda q, k, v, scaling, *_: (
        {"scale": scaling, "window_size": (-1, 0), "enable_gqa": True}, torch.float64))
    torch.manual_seed(0)
    position_ids = torch.tensor([list(range(5)) + list(range(40)) + list(range(3)) + list(range(16)),
                                 list(range(60)) + list(range(4))])
    batch, tokens = position_ids.shape
    heads, kv_heads, dim = 6, 2, 8
    # as the model hands them over: transposed views of (B, T, H, D) projections, and (as under
    # autocast, where the rotary embedding promotes queries and keys) not all in the call's dtype
    q, k, v = (torch.randn(batch, tokens, h, dim, dtype=dtype).transpose(1, 2).requires_grad_()
               for h, dtype in ((heads, torch.float64), (kv_heads, torch.float64), (kv_heads, torch.float32)))
    layout = PackedLayout.of(position_ids)
    out, _ = packed_attention_forward(Attention().train(), q, k, v, None, scaling=dim ** -0.5, packed_layout=layout)
    assert layout.offsets[0].tolist() == [0, 5, 45, 48, 64, 124, 128] and layout.offsets[1] == 60
    assert "_bucketed" not in vars(layout)  # the buckets are never built on this path
    ref = block_diagonal_reference(q, k, v.double(), position_ids)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    assert grads[2].dtype == torch.float32
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_this_torchs_varlen_kernel_takes_the_arguments_rayft_passes():
    """torch's varlen_attn, on meta tensors (its CUDA kernel cannot run here), accepts the causal,
    scaled, grouped-query call that rayft builds for this torch's signature, forward and backward;
    the older signatures get theirs; and without CUDA rayft does not take that path."""
    from rayft.train.attention import _flash_varlen_call, _varlen_kernel, causal_varlen_arguments

    if _varlen_kernel() is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen (2.10 added it)")
    kernel, names = _varlen_kernel()
    tokens, heads, kv_heads, dim = 40, 9, 3, 64  # SmolLM2's grouped-query shape
    q, k, v = (torch.empty(tokens, h, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    offsets = torch.tensor([0, 10, 40], dtype=torch.int32, device="meta")
    out = kernel(q, k, v, offsets, offsets, 30, 30, **causal_varlen_arguments(names, dim ** -0.5, dim, grouped=True))
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert [g.shape for g in torch.autograd.grad(out.sum(), (q, k, v))] == [q.shape, k.shape, v.shape]
    # torch 2.11: window_size and scale, no enable_gqa; 2.10: is_causal and no scale
    assert causal_varlen_arguments(frozenset({"window_size", "scale"}), 0.1, dim, grouped=True) == {
        "window_size": (-1, 0), "scale": 0.1}
    assert causal_varlen_arguments(frozenset({"is_causal"}), dim ** -0.5, dim, grouped=True) == {"is_causal": True}
    assert causal_varlen_arguments(frozenset({"is_causal"}), 0.1, dim, grouped=True) is None
    cpu = torch.randn(1, heads, 4, dim, dtype=torch.bfloat16)
    assert _flash_varlen_call(cpu, cpu[:, :kv_heads], cpu[:, :kv_heads], dim ** -0.5, 0.0, True) is None


# two rows as the loader hands them over: two packed samples (3 and 4 tokens), and one sample of 4
# that collate pads to 7 (the padding's positions restart: a segment of its own)
TWO_ROWS = [{"input_ids": [5] * 7, "labels": [1] * 7, "position_ids": [0, 1, 2, 0, 1, 2, 3]},
            {"input_ids": [5] * 4, "labels": [1] * 4, "position_ids": [0, 1, 2, 3]}]
# the same with prompts: 7 learned next tokens, in three sequences of 2, 3 and 2
TWO_ROWS_WITH_PROMPTS = [{**row, "labels": [-100, 7, 8, -100, 9, 10, 11][:len(row["labels"])]} for row in TWO_ROWS]


def test_a_training_batch_builds_its_layout_without_reading_the_device():
    """The loop's batches keep their position ids on the host too, and the packed layout is built
    from those for the device the batch is on: on a GPU, reading the device's copy would wait for
    the previous step. The meta device stands in (its tensors cannot be read at all)."""
    from types import SimpleNamespace

    from rayft.data.packing import collate
    from rayft.train.attention import ATTENTION_NAME
    from rayft.train.loop import model_inputs, with_rows

    batch = with_rows(collate(TWO_ROWS, 0), [0, 1], 0, torch.device("meta"))
    assert batch["input_ids"].is_meta and batch["host"]["position_ids"].device.type == "cpu"
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=ATTENTION_NAME))
    layout = model_inputs(model, batch)["packed_layout"]
    assert layout.device.type == "meta" and layout.begin.tolist() == [0, 3, 7, 11]  # row 1's padding: its own
    assert layout.offsets[0].is_meta and layout.offsets[1] == 4


def flash_attn_stand_in():
    """benchmarks/flash_attn_shim's flash_attn, loaded under another name (nothing here may find a
    module called flash_attn: libraries would take it for the real package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "flash_attn_shim" / "flash_attn" / "__init__.py"
    spec = importlib.util.spec_from_file_location("flash_attn_stand_in", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llamafactorys_flash_attn_stand_in_attends_within_each_sample():
    """The stand-in that lets LLaMA-Factory run FlashAttention-2 on the GPU host (which cannot build
    flash-attn): on the CPU its varlen function equals the block-diagonal causal mask; flash_attn_func
    treats each row as one sample; and torch's CUDA kernel, on meta tensors, takes the call it builds
    for this torch (grouped-query, scaled, causal), forward and backward."""
    from rayft.train.attention import _varlen_kernel

    shim = flash_attn_stand_in()
    torch.manual_seed(0)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    q, k, v = (torch.randn(1, h, 10, 8, dtype=torch.float64) for h in (4, 2, 2))
    offsets = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    flat = [x[0].transpose(0, 1) for x in (q, k, v)]  # (tokens, heads, dim)
    out = shim.flash_attn_varlen_func(*flat, offsets, offsets, 5, 5, softmax_scale=8 ** -0.5, causal=True)
    torch.testing.assert_close(out, block_diagonal_reference(q, k, v, position_ids)[0])
    rows = shim.flash_attn_func(*[x.transpose(1, 2) for x in (q, k, v)], causal=True)
    torch.testing.assert_close(rows, block_diagonal_reference(q, k, v, torch.arange(10)[None]))
    if _varlen_kernel() is None:
        pytest.skip("torch < 2.10 has no varlen attention")
    meta = [torch.empty(40, h, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for h in (9, 3, 3)]
    meta_offsets = torch.tensor([0, 10, 40], dtype=torch.int32, device="meta")
    out = shim.flash_attn_varlen_func(*meta, meta_offsets, meta_offsets, 30, 30, softmax_scale=0.125, causal=True)
    assert out.shape == meta[0].shape
    assert [g.shape for g in torch.autograd.grad(out.sum(), meta)] == [x.shape for x in meta]
    with pytest.raises(NotImplementedError, match="sliding window"):  # named in its signature: not dropped
        shim.flash_attn_varlen_func(*flat, offsets, offsets, 5, 5, causal=True, window_size=(3, 3))
