"""Third-order tensor algebra along mode 3 (the t-product family) and tensor-CUR index selection.

Tensors here are laid out **stack-first**: shape ``(K, n1, n2)`` holds the K frontal slices
``W(:, :, k)`` of an ``n1 × n2 × K`` tensor, so that slice k is contiguous.  The t-product is a
circular convolution along the stack axis, i.e. a matrix product per Fourier slice; real tensors
use ``rfft``/``irfft`` (K//2 + 1 independent slices).  FFTs run in float32 even under autocast
(``torch.fft`` has no bf16 kernels) and every frequency is handled in one batched matmul.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _fft_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def rfft3(x: torch.Tensor) -> torch.Tensor:
    """Real FFT along the stack axis (dim 0), always in fp32/fp64 and never autocast."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.fft.rfft(_fft_dtype(x), dim=0)


def irfft3(x_hat: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`rfft3` for a stack of length ``k``."""
    with torch.autocast(device_type=x_hat.device.type, enabled=False):
        return torch.fft.irfft(x_hat, n=k, dim=0)


def t_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """t-product ``a * b`` of ``(K, n1, n2)`` and ``(K, n2, n3)`` real tensors -> ``(K, n1, n3)``."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"t_product: stack lengths differ ({a.shape[0]} vs {b.shape[0]})")
    k = a.shape[0]
    return irfft3(rfft3(a) @ rfft3(b), k)


def t_transpose(a: torch.Tensor) -> torch.Tensor:
    """t-transpose: transpose every slice and reverse slices 1..K-1, so (a * b)ᵀ = bᵀ * aᵀ."""
    at = a.transpose(-1, -2)
    return torch.cat([at[:1], at[1:].flip(0)], dim=0)


def t_pinv(a: torch.Tensor, rcond: Optional[float] = None) -> torch.Tensor:
    """t-pseudo-inverse: the Moore–Penrose pseudo-inverse of each Fourier slice."""
    k = a.shape[0]
    a_hat = rfft3(a)
    if rcond is None:
        pinv_hat = torch.linalg.pinv(a_hat)
    else:
        pinv_hat = torch.linalg.pinv(a_hat, rtol=rcond)
    return irfft3(pinv_hat, k)


def t_orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """The real ``(K, n, r)`` tensor 𝒬 whose every Fourier slice is the Q of a QR of ``a``'s slice (n ≥ r):
    orthonormal columns spanning the same space per slice, so 𝒬ᵀ * 𝒬 is the identity tube and 𝒬 * 𝒳 spans
    what ``a`` * 𝒳 spans.  The DC (and, for even K, Nyquist) slices are real: their QR is taken in real
    arithmetic, else a complex phase there would be lost by ``irfft``."""
    k = a.shape[0]
    a_hat = rfft3(a.detach().double())
    q_hat = torch.linalg.qr(a_hat).Q
    for f in ({0, k // 2} if k % 2 == 0 else {0}):
        q_hat[f] = torch.linalg.qr(a_hat[f].real).Q.to(q_hat.dtype)
    return irfft3(q_hat, k).to(a.dtype)


def frequency_weights(k: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Weight of each rfft frequency in a full-spectrum sum: rfft keeps one of each conjugate pair, so those
    count twice; DC and (even K) Nyquist once."""
    w = torch.full((k // 2 + 1,), 2.0, dtype=dtype, device=device)
    w[0] = 1.0
    if k % 2 == 0:
        w[-1] = 1.0
    return w


def select_indices(
    w: torch.Tensor,
    rank: int,
    mode: str = "deterministic",
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tensor-CUR indices ``(I, J)``: I = columns, J = rows, each of length ``rank``, sorted.

    ``deterministic`` is the paper's rule: top-r columns by Fourier-domain column norm, then top-r
    rows by the norm restricted to those columns (ties broken by index, so it is reproducible).
    ``sampled`` is CURLoRA's inverted-probability rule: p ∝ 1/score, drawn without replacement
    with ``generator`` (seed it for reproducibility).
    """
    k, n1, n2 = w.shape
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(f"rank {rank} must be between 1 and min(n1, n2) = {min(n1, n2)}")
    weights = frequency_weights(k, device=w.device)
    w_hat = rfft3(w.detach())
    col_score = (w_hat.abs().pow(2).sum(dim=1).sqrt() * weights[:, None]).sum(dim=0)
    cols = _pick(col_score, rank, mode, generator)
    row_score = (w_hat[:, :, cols].abs().pow(2).sum(dim=2).sqrt() * weights[:, None]).sum(dim=0)
    rows = _pick(row_score, rank, mode, generator)
    return cols, rows


def gradient_aligned_indices(w: torch.Tensor, g: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tensor-CUR indices ``(I, J)`` of ``w`` (K, n1, n2) by alignment with a gradient ``g`` of the same shape.

    Still columns and rows of 𝒲, but scored by the first-order gradient a core between them would receive
    instead of by their energy: per Fourier slice column j scores ‖Ŵ[:, j]ᴴ Ĝ‖² and row i ‖Ĝ Ŵ[i, :]ᴴ‖²
    (frequency-weighted over the slices); the top ``rank`` of each, sorted.
    """
    k, n1, n2 = w.shape
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(f"rank {rank} must be between 1 and min(n1, n2) = {min(n1, n2)}")
    weights = frequency_weights(k, torch.float64, device=w.device)
    w_hat, g_hat = rfft3(w.detach().double()), rfft3(g.detach().double())
    # ‖Ŵ[:, j]ᴴ Ĝ‖² = Ŵ[:, j]ᴴ (Ĝ Ĝᴴ) Ŵ[:, j]: an n1 × n1 product, never the n2 × n2 one
    gram = g_hat @ g_hat.conj().transpose(1, 2)
    col_score = ((w_hat.conj() * (gram @ w_hat)).real.sum(dim=1) * weights[:, None]).sum(dim=0)
    row_score = ((g_hat @ w_hat.conj().transpose(1, 2)).abs().pow(2).sum(dim=1) * weights[:, None]).sum(dim=0)
    return _pick(col_score, rank, "deterministic", None), _pick(row_score, rank, "deterministic", None)


def _pick(score: torch.Tensor, rank: int, mode: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    score = score.double().cpu()
    if mode == "deterministic":
        order = torch.argsort(-score, stable=True)
        chosen = order[:rank]
    elif mode == "sampled":
        inverse = 1.0 / score.clamp_min(torch.finfo(torch.float64).tiny)
        chosen = torch.multinomial(inverse / inverse.sum(), rank, replacement=False, generator=generator)
    else:
        raise ValueError(f"unknown index selection {mode!r} (use 'deterministic' or 'sampled')")
    return torch.sort(chosen).values


def tensor_cur(
    w: torch.Tensor,
    rank: int,
    mode: str = "deterministic",
    generator: Optional[torch.Generator] = None,
):
    """Tensor-CUR of ``(K, n1, n2)`` ``w``: returns ``(C, U0, R, I, J)`` with ``w ≈ C * U0 * R``.

    ``C = w[:, :, I]`` (K, n1, r), ``R = w[:, J, :]`` (K, r, n2), ``U0 = t_pinv(w[:, J][:, :, I])``.
    Exact when the tubal rank of ``w`` is at most ``rank`` and the chosen intersection is full-rank.
    """
    cols, rows = select_indices(w, rank, mode, generator)
    c = w[:, :, cols]
    r = w[:, rows, :]
    u0 = t_pinv(w[:, rows][:, :, cols])
    return c, u0, r, cols, rows


def curlora_indices(matrix: torch.Tensor, rank: int,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """CURLoRA's column and row choice for one ``n1 × n2`` matrix (arXiv 2408.14572), sorted.

    p_j = ‖W(:, j)‖² / ‖W‖_F² (rows alike, over the whole matrix), inverted and normalised, so that the
    columns and rows that carry the *least* energy are the likeliest; ``rank`` of each drawn without
    replacement, columns first, then rows, from ``generator`` (seed it for reproducibility).
    """
    n1, n2 = matrix.shape
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(f"rank {rank} must be between 1 and min(n1, n2) = {min(n1, n2)}")
    squares = matrix.detach().double().cpu().pow(2)
    # the normalisation by ‖W‖_F² cancels once the inverses are normalised: _pick inverts the norms directly
    cols = _pick(squares.sum(dim=0), rank, "sampled", generator)
    rows = _pick(squares.sum(dim=1), rank, "sampled", generator)
    return cols, rows


def t_svd_factors(w: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-``rank`` tubal components of ``(K, n1, n2)`` ``w`` as two real tensors (arXiv 2407.11292).

    Per Fourier slice Ŵ_f = U S Vᴴ; 𝒜 = 𝒰_r * 𝒮_r^{1/2} (K, n1, r) and ℬ = 𝒮_r^{1/2} * 𝒱_rᵀ (K, r, n2), so that
    𝒜 * ℬ is the best tubal-rank-``rank`` approximation of ``w``.  The DC (and, for even K, Nyquist) slices
    are real: their SVD is taken in real arithmetic, else a complex phase there would be lost by ``irfft``.
    """
    k, n1, n2 = w.shape
    if not 1 <= rank <= min(n1, n2):
        raise ValueError(f"rank {rank} must be between 1 and min(n1, n2) = {min(n1, n2)}")
    w_hat = rfft3(w.detach())
    u, s, vh = torch.linalg.svd(w_hat, full_matrices=False)
    u, s, vh = u[:, :, :rank].clone(), s[:, :rank].clone(), vh[:, :rank, :].clone()
    for f in {0, k // 2} if k % 2 == 0 else {0}:
        ur, sr, vhr = torch.linalg.svd(w_hat[f].real, full_matrices=False)
        u[f], s[f], vh[f] = ur[:, :rank].to(u.dtype), sr[:rank], vhr[:rank].to(vh.dtype)
    root = s.sqrt()
    a_hat = u * root[:, None, :].to(u.dtype)
    b_hat = root[:, :, None].to(vh.dtype) * vh
    return irfft3(a_hat, k), irfft3(b_hat, k)
