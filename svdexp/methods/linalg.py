"""Linear algebra shared by the methods: damped Cholesky, whitening, truncated SVD, least squares.

Everything here works in float64; callers cast the factors back to the model's dtype.

The SVDs of matrices that do not depend on the rank (``W``, ``W S``, ``D W``, ...) are requested with a
:class:`Recipe` (how the matrix is made from the weight being compressed): inside :func:`svd_provider` (the
runner installs the on-disk cache of :mod:`svdexp.cache` there) a sweep over ratios decomposes each of them
once. While the runner compresses a weight it names it with :func:`weight_in_use`; the provider can then key
the matrix by that name and the recipe's small inputs instead of reading the whole matrix, and on a hit the
matrix is never built.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class Recipe:
    """A rank-independent matrix as a function of the weight ``W`` being compressed: ``op`` names the
    function (e.g. ``"W S"``) and ``inputs`` holds every other tensor it reads (scalings, whitening factor)."""
    op: str
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


# (build M, k, recipe, name of the weight in use or None) -> (U_k, all singular values, V_k^T) of M (float64)
SVDProvider = Callable[[Callable[[], torch.Tensor], int, Recipe, "str | None"],
                       "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
_PROVIDER: contextvars.ContextVar[SVDProvider | None] = contextvars.ContextVar("svd_provider", default=None)
_WEIGHT: contextvars.ContextVar[str | None] = contextvars.ContextVar("weight_in_use", default=None)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def svd_provider(provider: SVDProvider | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, :func:`thin_svd` calls with a recipe are answered by ``provider``."""
    return _setting(_PROVIDER, provider)


def weight_in_use(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, recipes refer to the (unmodified) model weight called ``name``."""
    return _setting(_WEIGHT, name)


@dataclass
class Cholesky:
    """Lower factor ``S`` with ``H + damping * I = S S^T``; ``damping`` is 0 when ``H`` was PD as is."""
    S: torch.Tensor
    damping: float


def damped_cholesky(H: torch.Tensor, eps: float = 1e-6, max_tries: int = 12) -> Cholesky:
    """Cholesky of ``H``; if it is not positive definite, add ``eps * mean(diag H) * I`` and grow eps x10.

    METHODS.md decision: a relative damping, grown until the factorisation succeeds, counted by callers.
    """
    H = H.double()
    S, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return Cholesky(S, 0.0)
    scale = H.diagonal().mean().abs().item() or 1.0
    for _ in range(max_tries):
        damping = eps * scale
        S, info = torch.linalg.cholesky_ex(H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        if int(info) == 0:
            return Cholesky(S, damping)
        eps *= 10.0
    raise torch.linalg.LinAlgError("H is not positive definite even after damping")


def thin_svd(M: torch.Tensor | Callable[[], torch.Tensor], k: int, recipe: Recipe | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_k``, every singular value, ``V_k^T`` of ``M`` (float64); ``M`` may be a function that builds it.

    ``recipe``: ``M`` is made from the weight being compressed as the recipe says, whatever the rank, so an
    active :func:`svd_provider` may answer from its cache, building ``M`` only when it has to decompose it
    (``None`` for matrices that depend on ``k``, such as a residual).
    """
    build = M if callable(M) else (lambda: M)
    provider = _PROVIDER.get() if recipe is not None else None
    if provider is not None:
        return provider(lambda: build().double(), k, recipe, _WEIGHT.get())
    U, sigma, Vh = torch.linalg.svd(build().double(), full_matrices=False)
    return U[:, :k], sigma, Vh[:k]


def truncated_svd(M: torch.Tensor | Callable[[], torch.Tensor], k: int, recipe: Recipe | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_k, sigma_k, V_k^T`` of ``M`` (float64): the top-``k`` singular triplets (``recipe``: see
    :func:`thin_svd`)."""
    U, sigma, Vh = thin_svd(M, k, recipe)
    return U, sigma[:k], Vh


def split_sqrt(U: torch.Tensor, sigma: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``A = U sigma^1/2``, ``B = sigma^1/2 V^T``."""
    root = sigma.sqrt()
    return U * root, root[:, None] * Vh


def whitened_factors(W: torch.Tensor, S: torch.Tensor, k: int, reuse: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM's truncation-aware whitening: SVD of ``W S``, ``B = sigma^1/2 V^T S^-1`` by triangular solve.

    Returns ``A, B`` and all singular values of ``W S`` (the discarded ones are the truncation loss).
    ``reuse``: ``W`` is the weight being compressed, so the SVD may come from the provider (see
    :func:`thin_svd`); ``False`` when ``W`` is anything else, e.g. a residual that depends on the rank.
    """
    recipe = Recipe("W S", {"S": S}) if reuse else None
    U, sigma, Vh = thin_svd(lambda: W.double() @ S, k, recipe)
    A, Bw = split_sqrt(U, sigma[:k], Vh)
    # B = Bw S^-1  <=>  B S = Bw  <=>  S^T B^T = Bw^T  (S lower triangular, so S^T is upper)
    B = torch.linalg.solve_triangular(S.T, Bw.T, upper=True).T
    return A, B, sigma


def pinv_solve(M: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
    """``M^+ rhs`` via an SVD-based pseudo-inverse (robust to singular ``M``)."""
    return torch.linalg.pinv(M.double(), rtol=rcond) @ rhs.double()


def positive_floor(v: torch.Tensor, rel: float = 1e-8) -> torch.Tensor:
    """``v`` (non-negative weights) with every entry raised to at least ``rel * max(v)``.

    Guards the divisions ``D^-1`` of the scaled methods against zero importances (dead channels, rows with no
    gradient). An all-zero ``v`` carries no information and becomes all ones (no scaling).
    """
    v = v.double()
    top = v.max().item() if v.numel() else 0.0
    if not top > 0.0:
        return torch.ones_like(v)
    return v.clamp(min=rel * top)


def scaled_factors(W: torch.Tensor, k: int, left: torch.Tensor | None = None,
                   right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``diag(left) W diag(right)``, then ``A <- diag(left)^-1 A``, ``B <- B diag(right)^-1``.

    The scaling vectors must be positive (see :func:`positive_floor`); ``None`` means no scaling on that side.
    ``W`` is the weight being compressed (its SVD may come from the provider, see :func:`thin_svd`).
    """
    def build() -> torch.Tensor:
        M = W.double()
        if left is not None:
            M = left.double()[:, None] * M
        if right is not None:
            M = M * right.double()[None, :]
        return M

    inputs = {side: v for side, v in (("left", left), ("right", right)) if v is not None}
    A, B = split_sqrt(*truncated_svd(build, k, Recipe("diag(left) W diag(right)", inputs)))
    if left is not None:
        A = A / left.double()[:, None]
    if right is not None:
        B = B / right.double()[None, :]
    return A, B


def solve_left_factor(W: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Least-squares ``A`` for fixed ``B``: ``argmin_A ||(W - A B) X||_F = W H B^T (B H B^T)^+`` with ``H = X X^T``."""
    W, B, H = W.double(), B.double(), H.double()
    HBt = H @ B.T                        # n x k
    G = B @ HBt                          # k x k, symmetric PSD
    # A = (W H B^T) G^+ = (G^+ (W H B^T)^T)^T since G^+ is symmetric
    return pinv_solve(G, (W @ HBt).T).T


def solve_right_factor(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Least-squares ``B`` for fixed ``A``: ``(A^T A)^+ A^T W``.

    It minimises ``||W - A B||_F`` and also ``||(W - A B) X||_F`` for every ``X`` (normal equations
    ``A^T (W - A B) H = 0`` hold whatever ``H``).
    """
    A = A.double()
    return pinv_solve(A.T @ A, A.T @ W.double())


def activation_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> float:
    """``||(W - A B) X||_F^2 = tr((W - A B) H (W - A B)^T)`` with ``H = X X^T``."""
    E = W.double() - A.double() @ B.double()
    return float(((E @ H.double()) * E).sum())
