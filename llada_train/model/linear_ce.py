"""Cross-entropy of the output head without a (positions x vocab) float32 tensor.

At the released vocabulary (157,184) the logits of one 4k-token row over `[x_t ; x_0]` are about
5 GB in float32 before their gradient. `linear_cross_entropy` takes the hidden states of only the
positions a loss reads and the head weight, and walks them in chunks: a chunk's logits live
inside the forward and are recomputed in the backward, so memory is one chunk of logits plus the
(N,) results (when all N rows fit in one chunk, that chunk is kept for the backward instead).
Value and gradient are those of `F.cross_entropy(F.linear(h, W).float(), y)` (and of the same
softmax's entropy, for the CAP term) up to float rounding; hand-written because the entropy and
argmax are needed from the same chunks, which the fused-CE libraries do not return.
"""

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB in float32 (53 rows at vocab 157,184)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits are reduced in float32, or float64 when the weights are (the float64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, weight).to(_compute_dtype(weight.dtype))  # (C, V)


def _entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) = lse - Σ p·z per row: (C,)."""
    probs = (logits - lse[:, None]).exp()
    return lse - (probs * logits).sum(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), targets (N,)) -> ce (N,), entropy (N,) or (0,), argmax (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy: bool, chunk: int):
        n, dtype = hidden.shape[0], _compute_dtype(weight.dtype)
        ce = hidden.new_empty(n, dtype=dtype)
        lse = hidden.new_empty(n, dtype=dtype)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=dtype)
        pred = torch.empty(n, dtype=torch.long, device=hidden.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            logits = _chunk_logits(hidden[lo:hi], weight)  # (C, V)
            lse[lo:hi] = logits.logsumexp(-1)
            ce[lo:hi] = lse[lo:hi] - logits.gather(1, targets[lo:hi, None]).squeeze(1)
            pred[lo:hi] = logits.argmax(-1)
            if with_entropy:
                entropy[lo:hi] = _entropy(logits, lse[lo:hi])
        one_chunk = logits if 0 < n <= chunk else hidden.new_empty(0)  # small: keep, skip the recompute
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, one_chunk)
        ctx.with_entropy, ctx.chunk = with_entropy, chunk
        ctx.mark_non_differentiable(pred)
        return ce, entropy, pred

    @staticmethod
    def backward(ctx, grad_ce, grad_entropy, _grad_pred):
        hidden, weight, targets, lse, entropy, one_chunk = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)
        for lo in range(0, hidden.shape[0], ctx.chunk):
            hi = min(lo + ctx.chunk, hidden.shape[0])
            if one_chunk.numel():  # the saved chunk: a fresh buffer, since the rest works in place on it
                logp = one_chunk - lse[lo:hi, None]  # (C, V)
            else:
                logp = _chunk_logits(hidden[lo:hi], weight).sub_(lse[lo:hi, None])  # (C, V)
            grad_logits = _chunk_grad_logits(logp, targets[lo:hi], grad_ce[lo:hi],
                                             entropy[lo:hi] if ctx.with_entropy else None,
                                             grad_entropy[lo:hi] if ctx.with_entropy else None)
            grad_logits = grad_logits.to(weight.dtype)  # (C, V)
            if grad_hidden is not None:
                grad_hidden[lo:hi] = grad_logits @ weight
            if grad_weight is None:
                continue
            if grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.T, hidden[lo:hi])
            else:  # low-precision weights: GEMM in their dtype, summed in float32
                grad_weight += grad_logits.T @ hidden[lo:hi]
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunk_grad_logits(logp, targets, grad_ce, entropy, grad_entropy) -> torch.Tensor:
    """d/dz of Σ g_ce·CE + g_H·H for one chunk, overwriting `logp` (C, V):
    p·(g_ce - g_H·(log p + H)) - g_ce·onehot."""
    if entropy is None:
        grad = logp.exp_().mul_(grad_ce[:, None])
    else:
        probs = logp.exp()
        grad = logp.add_(entropy[:, None]).mul_(-grad_entropy[:, None]).add_(grad_ce[:, None]).mul_(probs)
    return grad.scatter_add_(1, targets[:, None], -grad_ce[:, None].to(grad.dtype))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         with_entropy: bool = False, chunk_size: int | None = None):
    """CE of `F.linear(hidden, weight)` towards `targets`, chunked over the N positions.

    hidden (N, H), weight (V, H), targets (N,). Returns (ce (N,), entropy (N,) or None, argmax (N,)),
    ce and entropy in float32 (float64 for float64 weights) and differentiable, argmax without grad.
    """
    if hidden.shape[:-1] != targets.shape or hidden.dim() != 2:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be (N, H) with targets "
                         f"(N,); got targets {tuple(targets.shape)}")
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
    ce, entropy, pred = _LinearCrossEntropy.apply(hidden, weight, targets, with_entropy, chunk)
    return ce, entropy if with_entropy else None, pred


class LMHead(nn.Linear):
    """The output projection (`lm_head`, an nn.Linear as released). Given `targets` it returns
    `linear_cross_entropy`'s (ce, entropy, argmax) instead of logits; the loss runs inside this
    module's forward so hooks that gather a sharded weight (DeepSpeed ZeRO-3) see the call."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, with_entropy: bool = False):
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, with_entropy=with_entropy)
