"""Matrix functions of the orthogonal group: the skew part, the exponential
by a Taylor polynomial sized to its argument (FastExp), the polar projection
and a cheap Newton-Schulz step toward it. Plain torch; lipnext.manifold
applies them to the weights.

Each takes one matrix (n, m) or a stack (k, n, m) of matrices of one shape,
which it treats together: batched matmuls, and a single host sync per stack
where a size decides the algorithm (a Taylor order, an iteration's end).
"""

import math
from typing import Literal, get_args

import torch

FAST_EXP_ORDERS = ((0.05, 2), (0.2, 3), (0.5, 4))
"""(bound on rho = sqrt(||A^2||_F), Taylor order) of FastExp; matrix_exp beyond."""
PAPER_EXP_ORDERS = ((0.05, 2), (0.25, 3), (1.0, 4))
"""The reference's FastExp: (bound on ||A||_F, Taylor order); matrix_exp beyond."""
ExpSizing = Literal["rho", "frobenius"]
EXP_SIZINGS = get_args(ExpSizing)

ROUNDING_PASSES = 4
"""One-ulp passes that make the float32 polar factor more orthogonal than rounding to nearest."""


def skew(m: torch.Tensor) -> torch.Tensor:
    # The transpose is copied first: an elementwise op reading one operand transposed runs
    # ~2.5x slower on these CPUs (4.8 ms against 1.8 + 0.4 ms at n = 1024); the values are the same.
    transposed = m.mT.contiguous()
    return torch.sub(m, transposed, out=transposed).div_(2)


def exp_order(a: torch.Tensor, a2: torch.Tensor, sizing: str = "rho") -> int | None:
    """The Taylor order of FastExp for A (a stack: for its largest matrix), or
    None for matrix_exp; a2 = A^2. One host sync.

    The reference sizes A by ||A||_F (PAPER_EXP_ORDERS, sizing="frobenius"),
    but the remainder scales with ||A||_2, which for the dense steps Adam takes
    on an n x n matrix is ~2 ||A||_F / sqrt(n). "rho" sizes A by
    rho = sqrt(||A^2||_F), a bound on ||A||_2 that costs nothing (A^2 is the
    first term anyway), with thresholds that keep every entry within 1e-6 of
    matrix_exp for n >= 128 (tests/test_manifold.py). For a width-1024 Adam
    step this is order 3 instead of 4, and Lookahead's half-sum of six steps a
    polynomial instead of matrix_exp (benchmarks/manifold_step.py).
    """
    if sizing == "rho":
        size, orders = torch.linalg.vector_norm(a2, dim=(-2, -1), dtype=a.dtype).max().sqrt(), FAST_EXP_ORDERS
    else:
        size, orders = torch.linalg.matrix_norm(a).max(), PAPER_EXP_ORDERS
    # The stack's largest size sets everyone's order: a higher order only adds accuracy.
    size = size.item()
    return next((order for limit, order in orders if size < limit), None)


def expm1(a: torch.Tensor, dtype: torch.dtype | None = None, sizing: str = "rho") -> torch.Tensor:
    """exp(A) - I for a skew A (or a stack), by FastExp, with the powers of A
    computed in `dtype` (default: A's own) and summed in A's dtype.

    Low precision is safe for the powers and only there: rounding A to bfloat16
    keeps it exactly skew (a slightly different step, still along the
    manifold), and the rounding of A^2/2 + A^3/6 + ... costs orthogonality in
    proportion to those terms, ~2e-3 rho^2 per step. The product that applies
    the first-order term to the weights must not be rounded so: a bfloat16
    W (exp(A) - I) costs 50-200x more (2e-3 per step at rho = 0.15).
    """
    low = a.to(dtype or a.dtype)
    term = low @ low
    order = exp_order(a, term, sizing)
    if order is None:
        return torch.linalg.matrix_exp(a) - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    out = low.to(a.dtype, copy=True)
    out.add_(term, alpha=1 / 2)
    for k in range(3, order + 1):
        term = term @ low
        out.add_(term, alpha=1 / math.factorial(k))
    return out


def fast_exp(a: torch.Tensor, sizing: str = "rho") -> torch.Tensor:
    """exp(A) by a Taylor polynomial whose order grows with the size of A (exp_order)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) + expm1(a, sizing=sizing)


def newton_schulz_step(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One Newton-Schulz step toward the polar factor, W - W (W^T W - I) / 2
    (of the columns if tall, of the rows if wide), the product with the small
    correction in `dtype` (default: W's own), the Gram matrix in W's.

    From a drift e = ||W^T W - I||_F it leaves ~e^2 plus the Gram matrix's
    rounding: 1.1e-5 at n = 1024 in fp32 from any e <= 1e-2, for two matmuls
    where polar takes ~15 in fp64. Drift control between projections, not a
    projection a certificate may rely on.
    """
    tall = w.shape[-2] >= w.shape[-1]
    x = w if tall else w.mT
    excess = x.mT @ x - torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    low = dtype or x.dtype
    x = x - (x.to(low) @ excess.to(low)).to(x.dtype) / 2
    return x if tall else x.mT


def polar(w: torch.Tensor, tol: float = 1e-12, max_iter: int = 30) -> torch.Tensor:
    """The nearest matrix with orthonormal rows (wide) or columns (tall),
    computed in float64 and returned in w's dtype: a float32 one as orthogonal
    as float32 allows (_round_orthogonal).

    Newton-Schulz X <- X (3I - X^T X) / 2 (3 matmuls, converges quadratically
    from a near-orthogonal X, as between two projections); an SVD when X is
    too far off for it to converge. A stack iterates until its worst matrix
    has converged."""
    x = w.double()
    tall = x.shape[-2] >= x.shape[-1]
    if not tall:
        x = x.mT
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(max_iter):
        gram = x.mT @ x
        err = torch.linalg.matrix_norm(gram - eye).max().item()
        if err < tol:
            break
        if err > 0.5:
            u, _, vh = torch.linalg.svd(x, full_matrices=False)
            x = u @ vh
            break
        x = x @ (1.5 * eye - 0.5 * gram)
    x = _round_orthogonal(x) if w.dtype == torch.float32 else x.to(w.dtype)
    return x if tall else x.mT


def _round_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """x (float64, orthonormal columns) in float32, more orthogonal than x
    rounded to nearest.

    Rounding leaves ||W^T W - I||_F at ~3.6e-8 sqrt(n): 1.15e-6 at n = 1024,
    over what a certificate of a hundred such factors can afford. A pass
    moves every entry by one ulp where that lowers ||W^T W - I||_F^2 at first
    order (by 4 |(W (W^T W - I))_ij| ulp) by 1.5x more than it raises it at
    second (2 ulp^2): the margin for the moves made at once, which interact
    little (rows and columns orthogonal). Four passes halve the error
    (6.1e-7 at n = 1024), every entry within 4 ulps of x's rounding.
    """
    w = x.float()
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    infinity = torch.tensor(torch.inf, dtype=w.dtype, device=w.device)
    for _ in range(ROUNDING_PASSES):
        wd = w.double()
        slope = wd @ (wd.mT @ wd - eye)  # a quarter of the gradient of ||W^T W - I||_F^2
        moved = torch.nextafter(w, torch.where(slope > 0, -infinity, infinity))
        step = moved.double() - wd
        w = torch.where(-slope * step > 0.75 * step * step, moved, w)
    return w
