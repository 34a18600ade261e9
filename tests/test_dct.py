"""ops/dct.py against scipy.fft and the explicit DCT-II matrix of Eq. 2 (arXiv:2502.06820)."""

import math

import mpmath
import numpy as np
import pytest
import scipy.fft
import torch

from dist_peft.ops.dct import dct, dct_basis, dct_packed, idct, idct_packed, packed_index, packed_size

LENGTHS = [1, 2, 3, 5, 8, 9, 64, 192, 576, 1536, 4096, 11008, 28672]


def eq2_matrix(n: int) -> np.ndarray:
    """C[i, j] = √(2/n) k_i cos(π (2j+1) i / (2n)), k_0 = 1/√2, k_i = 1 (Eq. 2), written out in numpy."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    k = np.where(i == 0, 1 / math.sqrt(2), 1.0)
    return math.sqrt(2 / n) * k * np.cos(math.pi * (2 * j + 1) * i / (2 * n))


@pytest.mark.parametrize("n", LENGTHS)
def test_dct_and_inverse_match_scipy_ortho(n):
    """dct / idct equal scipy.fft.dct / idct(norm='ortho') in fp64 for even, odd and model widths."""
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ref = scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)
    np.testing.assert_allclose(dct(x).numpy(), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(idct(x).numpy(), scipy.fft.idct(x.numpy(), norm="ortho", axis=-1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(idct(dct(x)).numpy(), x.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 192])
def test_dct_is_the_explicit_matrix_of_eq2(n):
    """dct(x) = C x and idct(X) = Cᵀ X with C written from Eq. 2; dct_basis returns slices of that C."""
    C = eq2_matrix(n)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(dct(x).numpy(), x.numpy() @ C.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(idct(x).numpy(), x.numpy() @ C, rtol=0, atol=1e-12)
    np.testing.assert_allclose(C @ C.T, np.eye(n), atol=1e-12)
    freqs, positions = torch.randint(0, n, (5,)), torch.randint(0, n, (6,))
    np.testing.assert_allclose(dct_basis(n, freqs, positions, torch.float64).numpy(),
                               C[freqs.numpy()][:, positions.numpy()], rtol=0, atol=1e-12)


def test_dct_basis_is_exact_at_large_indices():
    """The analytic basis keeps fp64 accuracy at n = 28672, where the cosine argument reaches ~9e4 rad."""
    n = 28672
    freqs, positions = [0, 1, n // 2, n - 3, n - 1], [0, 5, n // 3, n - 2, n - 1]
    with mpmath.workdps(40):  # the unreduced argument in 40-digit arithmetic
        ref = [[float(mpmath.sqrt(mpmath.mpf(1 if k == 0 else 2) / n) * mpmath.cos(mpmath.pi * (2 * j + 1) * k / (2 * n)))
                for j in positions] for k in freqs]
    out = dct_basis(n, torch.tensor(freqs), torch.tensor(positions), torch.float64).numpy()
    np.testing.assert_allclose(out, np.array(ref), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_any_dimension(dim):
    """The transforms act along the requested dimension of a 3-D tensor (scipy ``axis``)."""
    x = torch.randn(5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(dct(x, dim=dim).numpy(), scipy.fft.dct(x.numpy(), norm="ortho", axis=dim), atol=1e-12)
    np.testing.assert_allclose(idct(x, dim=dim).numpy(), scipy.fft.idct(x.numpy(), norm="ortho", axis=dim),
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_is_computed_in_fp32(dtype):
    """bf16 / fp16 / fp32 inputs give fp32 results equal to the fp64 transform of the same (rounded) values."""
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3)).to(dtype)
    exact = dct(x.double())
    out = dct(x)
    assert out.dtype == torch.float32 and idct(x).dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(idct(x).double(), idct(x.double()), rtol=0, atol=1e-5)
    assert dct(x.double()).dtype == torch.float64


@pytest.mark.parametrize("n", [1, 6, 7, 576])
def test_packed_layout_holds_every_frequency(n):
    """dct(x)[k] = sign[k] · dct_packed(x)[slot[k]]; idct_packed inverts it and ignores unmapped slots."""
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    slot, sign = packed_index(n, x.device, torch.float64)
    packed = dct_packed(x)
    assert packed.shape[-1] == packed_size(n) and len(set(slot.tolist())) == n
    torch.testing.assert_close(packed[:, slot] * sign, dct(x), rtol=0, atol=1e-12)
    scratch = torch.randn_like(packed)  # values at the slots no frequency maps to must not matter
    scratch[:, slot] = packed[:, slot]
    torch.testing.assert_close(idct_packed(scratch, n), x, rtol=0, atol=1e-12)
