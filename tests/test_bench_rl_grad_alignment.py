"""The gradient-alignment benchmark's cosine bookkeeping, against hand-computed values."""

import math

import pytest
import torch

from benchmarks.bench_rl_grad_alignment import flat_grad, mean_cosine


def test_mean_cosine_within_and_across_sets():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])]
    b = [torch.tensor([0.0, -3.0])]
    r = 1 / math.sqrt(2)
    assert mean_cosine(a) == pytest.approx((r + 0.0 + r) / 3)  # pairs (0,1) (0,2) (1,2)
    assert mean_cosine(a, b) == pytest.approx((0.0 - r - 1.0) / 3)


def test_flat_grad_concatenates_every_parameter_and_clears_grads():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    x = torch.randn(5, 3, dtype=torch.float64)
    model = model.double()
    grad = flat_grad(model, model(x).sum())
    by_hand = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    assert torch.allclose(grad, torch.cat([g.flatten() for g in by_hand]))
    assert all(p.grad is None for p in model.parameters())
