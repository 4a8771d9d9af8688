"""Matrix functions of the orthogonal group: the skew part, the exponential
by a Taylor polynomial sized to its argument (FastExp), and the polar
projection. Plain torch; lipnext.manifold applies them to the weights.

Each takes one matrix (n, m) or a stack (k, n, m) of matrices of one shape,
which it treats together: batched matmuls, and a single host sync per stack
where a size decides the algorithm (a Taylor order, an iteration's end).
"""

import torch

FAST_EXP_ORDERS = ((0.05, 2), (0.2, 3), (0.5, 4))
"""(bound on rho = sqrt(||A^2||_F), Taylor order) of FastExp; matrix_exp beyond."""


def skew(m: torch.Tensor) -> torch.Tensor:
    return (m - m.mT) / 2


def fast_exp(a: torch.Tensor) -> torch.Tensor:
    """exp(A) by a Taylor polynomial whose order grows with the size of A.

    The reference sizes A by ||A||_F (orders 2/3/4 below 0.05/0.25/1), but the
    remainder scales with ||A||_2, which for the dense steps Adam takes on an
    n x n matrix is ~2 ||A||_F / sqrt(n). We size A by rho = sqrt(||A^2||_F),
    a bound on ||A||_2 that costs nothing (A^2 is the first term anyway), with
    thresholds that keep every entry within 1e-6 of matrix_exp for n >= 128
    (tests/test_manifold.py). For a width-1024 Adam step this is order 3
    instead of 4, and Lookahead's half-sum of six steps a polynomial instead
    of matrix_exp (benchmarks/manifold_step.py).
    """
    a2 = a @ a
    # The stack's largest rho sets everyone's order: one host sync, and a higher order only adds accuracy.
    rho = torch.linalg.matrix_norm(a2).max().sqrt().item()
    for limit, order in FAST_EXP_ORDERS:
        if rho < limit:
            out = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) + a + a2 / 2
            term = a2 / 2
            for k in range(3, order + 1):
                term = term @ a / k
                out = out + term
            return out
    return torch.linalg.matrix_exp(a)


def polar(w: torch.Tensor, tol: float = 1e-12, max_iter: int = 30) -> torch.Tensor:
    """The nearest matrix with orthonormal rows (wide) or columns (tall), in
    float64. Newton-Schulz X <- X (3I - X^T X) / 2 (3 matmuls, converges
    quadratically from a near-orthogonal X, as between two projections); an
    SVD when X is too far off for it to converge. A stack iterates until its
    worst matrix has converged."""
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
    return (x if tall else x.mT).to(w.dtype)
