"""rayft's attention over packed rows equals attention under the block-diagonal causal mask."""

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
