import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its interpreter on CPU

import pytest
import torch
import torch.nn.functional as F

from llada_train.kernels.hadamard import RHT_DIMS, hadamard_matrix, rht


@pytest.mark.parametrize("d", RHT_DIMS)
def test_hadamard_matrix_is_orthogonal_with_signed_entries(d):
    h = hadamard_matrix(d, seed=d)
    assert torch.allclose(h @ h.t(), torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((d, d), d**-0.5, dtype=torch.float64))
    # H = diag(s)·Hadamard: dividing out the first row's signs leaves a symmetric Sylvester matrix.
    plain = h / h[:, :1]
    assert torch.allclose(plain, plain.t())
    assert not torch.equal(hadamard_matrix(d, seed=1), hadamard_matrix(d, seed=2))


@pytest.mark.parametrize("d", RHT_DIMS)
def test_rht_equals_dense_blockwise_product(d):
    torch.manual_seed(d)
    x = torch.randn(7, 3 * d - 5, 5)  # odd shape: dim 1 gets zero-padded to 3d
    y = rht(x, d, dim=1, seed=11, impl="torch")
    assert y.shape == (7, 3 * d, 5)
    xp = F.pad(x.double().movedim(1, -1), (0, 5))  # (7, 5, 3d)
    ref = (xp.reshape(7, 5, 3, d) @ hadamard_matrix(d, seed=11)).reshape(7, 5, 3 * d).movedim(-1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    back = rht(y, d, dim=1, seed=11, inverse=True, impl="torch")
    assert torch.allclose(back[:, : 3 * d - 5], x, atol=1e-5)
    assert back[:, 3 * d - 5 :].abs().max() < 1e-5


@pytest.mark.parametrize("d", RHT_DIMS)
def test_triton_rht_equals_torch_bitwise(d):
    torch.manual_seed(100 + d)
    x = torch.randn(45, d + 19) * 3
    for dim in (0, 1):
        for inverse in (False, True):
            a = rht(x, d, dim=dim, seed=5, inverse=inverse, impl="torch")
            b = rht(x, d, dim=dim, seed=5, inverse=inverse, impl="triton")
            assert torch.equal(a, b)


def test_rht_cancels_in_a_gemm():
    torch.manual_seed(0)
    a, b = torch.randn(9, 70).double(), torch.randn(13, 70).double()
    for d in RHT_DIMS:
        ra, rb = rht(a, d, seed=3), rht(b, d, seed=3)
        assert torch.allclose(ra @ rb.t(), a @ b.t(), atol=1e-10)
        assert not torch.allclose(ra[:, :70], a)


def test_rejects_unsupported_block():
    with pytest.raises(ValueError, match="rht_dim"):
        rht(torch.randn(4, 24), 24)
