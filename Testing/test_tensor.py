"""Tensor maths: t-product, t-transpose, t-pinv, tensor-CUR."""

import pytest
import torch

from tcurlora.tensor import select_indices, t_pinv, t_product, t_transpose, tensor_cur


def block_circulant(a: torch.Tensor) -> torch.Tensor:
    """bcirc(a) for a (K, n1, n2) tensor: block (i, j) = a[(i - j) mod K]."""
    k, n1, n2 = a.shape
    rows = [torch.cat([a[(i - j) % k] for j in range(k)], dim=1) for i in range(k)]
    return torch.cat(rows, dim=0)


def unfold(b: torch.Tensor) -> torch.Tensor:
    return b.reshape(-1, b.shape[-1])  # slices stacked vertically


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_t_product_equals_block_circulant_product(k):
    g = torch.Generator().manual_seed(k)
    a = torch.randn(k, 4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(k, 3, 5, generator=g, dtype=torch.float64)
    expected = (block_circulant(a) @ unfold(b)).reshape(k, 4, 5)
    torch.testing.assert_close(t_product(a, b), expected, rtol=1e-10, atol=1e-10)


def test_t_transpose_reverses_products():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(t_transpose(t_product(a, b)), t_product(t_transpose(b), t_transpose(a)))
    torch.testing.assert_close(block_circulant(t_transpose(a)), block_circulant(a).T)


@pytest.mark.parametrize("shape", [(4, 6, 3), (5, 3, 7), (6, 4, 4)])
def test_t_pinv_moore_penrose_identities(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    p = t_pinv(a)
    tp = t_product
    torch.testing.assert_close(tp(tp(a, p), a), a, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(tp(tp(p, a), p), p, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(t_transpose(tp(a, p)), tp(a, p), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(t_transpose(tp(p, a)), tp(p, a), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("k,rank", [(1, 3), (4, 2), (7, 3)])
def test_cur_reconstructs_low_tubal_rank_exactly(k, rank):
    g = torch.Generator().manual_seed(k * 10 + rank)
    left = torch.randn(k, 12, rank, generator=g, dtype=torch.float64)
    right = torch.randn(k, rank, 9, generator=g, dtype=torch.float64)
    w = t_product(left, right)  # tubal rank = rank
    c, u0, r, cols, rows = tensor_cur(w, rank)
    assert c.shape == (k, 12, rank) and r.shape == (k, rank, 9) and u0.shape == (k, rank, rank)
    torch.testing.assert_close(t_product(t_product(c, u0), r), w, rtol=1e-7, atol=1e-7)


def test_cur_is_not_exact_above_the_rank():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 10, 10, generator=g, dtype=torch.float64)
    c, u0, r, _, _ = tensor_cur(w, 3)
    assert (t_product(t_product(c, u0), r) - w).abs().max() > 1e-2


def test_deterministic_selection_is_deterministic_and_picks_largest_column():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 20, 16, generator=g)
    w[:, :, 5] *= 50  # the dominant column must be chosen
    w[:, 11, :] *= 80  # and a dominant row
    first = select_indices(w, 4)
    for _ in range(3):
        again = select_indices(w.clone(), 4)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    cols, rows = first
    assert 5 in cols.tolist() and 11 in rows.tolist()
    assert torch.equal(cols, torch.sort(cols).values)


def test_sampled_selection_is_seeded():
    w = torch.randn(6, 20, 16, generator=torch.Generator().manual_seed(4))
    a = select_indices(w, 4, "sampled", torch.Generator().manual_seed(7))
    b = select_indices(w, 4, "sampled", torch.Generator().manual_seed(7))
    c = select_indices(w, 4, "sampled", torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(set(a[0].tolist())) == 4
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_fft_runs_in_fp32_under_autocast():
    a = torch.randn(4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = t_product(a, a)
    assert out.dtype == torch.float32
