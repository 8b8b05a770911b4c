"""The output head and the cross-entropy loss as one chunked step: the logits never exist in full.

A plain step computes the (learned tokens x vocabulary) logits, copies them to fp32, takes a
log-softmax, and in the backward builds the gradient of the same size again: 10 bytes per token
per vocabulary entry held from the forward to the backward (~120 MB for ~250 learned tokens of
SmolLM2's 49,152-token vocabulary; ~10 GB for 8k tokens of a 128k vocabulary). On CPU each
fresh array over 32 MB is also paged in anew (glibc serves such allocations by mmap). Here the
loss is computed over chunks of rows whose logits stay small, and the gradients with respect to
the hidden states (and the head's weight, when it trains) are computed in the same pass, while
the chunk's logits are at hand; the backward only scales them by the incoming gradient. On a
CPU step this gained ~2% of the time (README, Benchmark); the memory is the larger part.

Numbers are those of the plain step up to bf16 rounding: logits in the compute dtype (bf16
under autocast), the log-softmax in fp32, the logits' gradient rounded to the compute dtype for
the matmuls (before its scaling by the incoming gradient, where the plain step rounds after).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

# Model types whose causal-LM forward returns the head's output unchanged (no soft-capping, logit
# scaling or other transform after the head): the head may then return the loss itself.
HEAD_IS_LAST = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})
# Elements of one chunk's fp32 logits: 16 MB on CPU (under glibc's 32 MB mmap limit, so the
# memory is reused from chunk to chunk); on a GPU larger chunks keep the matmuls big enough.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def _chunked_loss(hidden, weight, bias, targets, compute_dtype, need_hidden: bool, need_logits: bool,
                  row_weights=None, per_row: bool = False):
    """The summed loss (each row's weighted by `row_weights`, if given; or, per_row, every row's
    loss), and (if asked) the gradient for `hidden` and every row's logits gradient, both for an
    incoming gradient of 1 (per row)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):  # the casts below are autocast's own
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        chunk = max(1, _CHUNK_ELEMENTS.get(hidden.device.type, 1 << 24) // vocab)
        loss = torch.zeros(rows if per_row else (), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(h) if need_hidden else None
        # every row's logits gradient is kept only when the weight or bias trains (one matmul at the end)
        grad_logits = torch.empty(rows, vocab, dtype=compute_dtype, device=h.device) if need_logits else None
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            logits = torch.addmm(b, h[start:stop], w.t()) if b is not None else h[start:stop] @ w.t()
            logits = logits.float()
            target = targets[start:stop, None]
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            row_losses = log_norm - logits.gather(1, target)
            chunk_weights = row_weights[start:stop, None] if row_weights is not None else None
            if per_row:
                loss[start:stop] = row_losses[:, 0]
            else:
                loss += (row_losses * chunk_weights).sum() if chunk_weights is not None else row_losses.sum()
            if not (need_hidden or need_logits):
                continue
            probs = logits.sub_(log_norm).exp_()  # softmax, in place of the logits
            probs.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=probs.dtype))  # minus one-hot
            if chunk_weights is not None:
                probs.mul_(chunk_weights)
            g = probs.to(compute_dtype)
            if need_hidden:
                torch.mm(g, w, out=grad_hidden[start:stop])
            if need_logits:
                grad_logits[start:stop] = g
    return loss, h, grad_hidden, grad_logits


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross_entropy(hidden @ weight.T + bias, targets) over the rows of `hidden`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, row_weights):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        loss, h, grad_hidden, grad_logits = _chunked_loss(hidden, weight, bias, targets, compute_dtype,
                                                          need_hidden, need_weight or need_bias, row_weights)
        grad_weight = grad_logits.t() @ h if need_weight else None
        grad_bias = grad_logits.float().sum(0) if need_bias else None
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # scaled in fp32 (the incoming gradient is 1 / learned tokens, or a loss scale)
        scale = lambda g, dtype: None if g is None else (g.float() * grad_loss).to(dtype)  # noqa: E731
        return (scale(grad_hidden, ctx.hidden_dtype), scale(grad_weight, ctx.weight_dtype),
                scale(grad_bias, ctx.bias_dtype), None, None, None)


class LinearTokenCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T + bias, targets) of each row of `hidden`, a vector: what a
    loss over segments of rows (a preference pair's sequences) needs, the logits still chunked.
    The rows' gradients are computed in the forward for an incoming gradient of 1 and scaled per
    row in the backward (exact: each row's loss is linear in its own incoming gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        losses, h, grad_hidden, grad_logits = _chunked_loss(hidden, weight, bias, targets, compute_dtype, need_hidden,
                                                            need_weight or need_bias, per_row=True)
        ctx.save_for_backward(grad_hidden, grad_logits, h if need_weight else None)
        ctx.dtypes = hidden.dtype, weight.dtype, bias.dtype if bias is not None else None
        ctx.needs = need_hidden, need_weight, need_bias
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_hidden, grad_logits, h = ctx.saved_tensors
        (hidden_dtype, weight_dtype, bias_dtype), (need_hidden, need_weight, need_bias) = ctx.dtypes, ctx.needs
        scale = grad_losses.float()[:, None]
        out_hidden = (grad_hidden.float() * scale).to(hidden_dtype) if need_hidden else None
        scaled_logits = (grad_logits.float() * scale) if (need_weight or need_bias) else None
        out_weight = (scaled_logits.to(h.dtype).t() @ h).to(weight_dtype) if need_weight else None
        out_bias = scaled_logits.sum(0).to(bias_dtype) if need_bias else None
        return out_hidden, out_weight, out_bias, None, None


def linear_token_losses(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """The head's loss of each row of `hidden` (rows x features) against `targets` (rows,)."""
    compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else head.weight.dtype
    if not torch.is_grad_enabled():
        return _chunked_loss(hidden, head.weight, head.bias, targets, compute_dtype, False, False, per_row=True)[0]
    return LinearTokenCrossEntropy.apply(hidden, head.weight, head.bias, targets, compute_dtype)


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                         row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The head's summed loss over `hidden` (rows x features) against `targets` (rows,), each
    row's loss weighted by `row_weights` (rows,) if given."""
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = head.weight.dtype
    if not torch.is_grad_enabled():  # evaluation: a Function would still see a trainable weight's requires_grad
        return _chunked_loss(hidden, head.weight, head.bias, targets, compute_dtype, False, False, row_weights)[0]
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, compute_dtype, row_weights)


def fused_head_loss_applies(model, head: torch.nn.Module, precision: str) -> bool:
    """A plain linear head (not, e.g., LoRA-wrapped), called through its class's forward (no
    accelerate hook replaced it), in a model that returns the head's output as is. Not in fp16:
    its loss scale must reach the logits' gradient before that is rounded to fp16 (against
    underflow), and here the gradient is rounded before the scale is known."""
    return (precision != "fp16" and type(head) is torch.nn.Linear and "forward" not in vars(head)
            and getattr(model.config, "model_type", None) in HEAD_IS_LAST)


@dataclass
class Learned:
    """The positions whose next token is learned: flat indices into rows x `width` positions (the
    model's hidden states), so that gathering them makes no boolean selection on the device (whose
    size the host would have to wait for)."""
    index: torch.Tensor
    width: int

    def rows_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states (rows x positions x features) at these positions."""
        if hidden.shape[1] != self.width:
            raise ValueError(f"learned positions over {self.width} positions per row, hidden states have {hidden.shape[1]}")
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)

    def rows(self) -> torch.Tensor:
        """The row of each position."""
        return self.index // self.width


@contextmanager
def head_returns_token_losses(head: torch.nn.Linear, learned: Learned, targets: torch.Tensor) -> Iterator[None]:
    """head_returns_loss with each learned position's loss (a vector) in place of their sum."""
    head.forward = lambda hidden: linear_token_losses(learned.rows_of(hidden), head, targets)
    try:
        yield
    finally:
        del head.forward


@contextmanager
def head_returns_loss(head: torch.nn.Linear, learned: Learned, targets: torch.Tensor,
                      target_weights: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Within the block the head takes the hidden states at the `learned` positions and returns
    their summed (weighted) loss against `targets` in place of logits. It is still called as a
    module (the instance's forward is replaced, not the call), so hooks around it, such as ZeRO-3
    gathering its weight, run as before."""
    head.forward = lambda hidden: linear_cross_entropy(learned.rows_of(hidden), head, targets, target_weights)
    try:
        yield
    finally:
        del head.forward  # back to the class's forward
