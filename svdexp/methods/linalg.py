"""Linear algebra shared by the methods: damped Cholesky, whitening, truncated SVD, least squares, and the
``auto`` solver (truncation from the Gram matrix of the smaller side, no ``S^-1``).

Everything here works in float64; callers cast the factors back to the model's dtype.

The SVDs of matrices that do not depend on the rank (``W``, ``W S``, ``D W``, ...) are requested with a
:class:`Recipe` (how the matrix is made from the weight being compressed): inside :func:`svd_provider` (the
runner installs the on-disk cache of :mod:`svdexp.cache.store` there) a sweep over ratios decomposes each of them
once. While the runner compresses a weight it names it with :func:`weight_in_use`; the provider can then key
the matrix by that name and the recipe's small inputs instead of reading the whole matrix, and on a hit the
matrix is never built.

Solver ``auto`` (``method.solver``; :func:`gram_truncation`). Every method truncates ``M = diag(l) W R`` for a
left scaling ``l`` (fwsvd rows; else 1) and a right factor ``R R^T = H_R`` (``I`` for svd, ``diag(d)^2`` for
asvd and fwsvd columns, ``H`` for the whitening methods). The best rank-``k`` ``W'`` for
``||diag(l) (W - W') R||_F`` is ``W' = diag(l)^-1 U_k U_k^T diag(l) W``, ``U_k`` the top-``k`` left singular
vectors of ``M``: no ``R^-1``, so no damping or triangular solve, and ``H`` may be singular. ``U_k``
comes from the Gram matrix of ``M``'s smaller side: for ``m <= n`` the eigenvectors of
``C = M M^T = diag(l) W H_R W^T diag(l)`` (for svd_llm this is ``C_out``, the Gram of the matrix's outputs,
when collected); for ``m > n`` the eigenvectors ``V`` of ``M^T M`` (``R``: any root of ``H``, see
:func:`psd_root`) and ``U = M V Sigma^-1`` (no QR: orthonormal to float64 eigh precision; a direction with
``sigma ~ 0`` carries no energy of ``X`` and is dropped, ``u_i = 0``), or with ``H_R = I`` ``W' = W V_k V_k^T``
without ``U``. Balanced factors ``A = diag(l)^-1 U_k Sigma_k^1/2``, ``B = Sigma_k^-1/2 U_k^T diag(l) W``
(with ``H`` PD exactly SVD-LLM's ``B = Sigma^1/2 V^T S^-1``); ``A B`` does not depend on ``Sigma``, so
components with ``Sigma ~ 0`` are left unbalanced (``A = U``) and ``B`` stays finite.

Precision (measured, one thread, synthetic ``W`` with ``H`` of condition 1e6 and 1e12 plus outlier channels;
truncation loss ``||(W - A B) X||^2`` relative to solver ``svd``'s at 20 % and 60 % parameter reduction):
float64 ``eigh`` stays within 6e-10 everywhere; float32 ``eigh`` (Gram formed in float64, then cast) loses
up to 4e-5 (576 x 576), 2e-2 (1536 x 576, cond 1e6) and 3e3 (1536 x 576, cond 1e12): the Gram squares the
condition number, beyond float32's 7 digits. So the eigendecompositions run in float64; only the kept
eigenvectors ``U`` are rounded to float32 (:data:`EIG_VECTORS`, with and without the cache alike, so results
are bit-identical), which costs at most 1.4e-7 of the loss (1536 x 576, cond 1e12) and halves the cache entry.
Time per matrix, svd_llm at 20 %, solver svd -> auto with ``H`` (-> auto with ``C_out``), one thread, best of 5
(1 run for the 7B shapes) on a shared 2-core VM: 576 x 576 0.138 -> 0.043 s; 192 x 576 0.032 -> 0.007
(0.004) s; 1536 x 576 0.250 -> 0.156 s; 576 x 1536 0.539 -> 0.150 (0.071) s; 4096 x 11008 173 -> 38 (19) s;
11008 x 4096 64 -> 39 s. Plain svd: 576 x 1536 0.385 -> 0.085 s, 4096 x 11008 136 -> 27 s, 11008 x 4096
58 -> 37 s. Dropping the QR of a tall ``M V`` (``U = M V Sigma^-1``) then took svd_llm's 1536 x 576 from 0.175 to
0.095 s, and the ``W V_k V_k^T`` route plain svd's from 0.120 to 0.068 s (beside another job). Float32 ``eigh``
would save another 1.7x on the eigendecomposition alone (4096: 14.5 -> 8.4 s).
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
    function (e.g. ``"W S"``) and ``inputs`` holds every other tensor it reads (scalings, whitening factor).

    ``kind``: what the built matrix is and how :func:`decompose` factorises it: ``"svd"`` the matrix ``M``
    itself, thin SVD; ``"gram"`` the Gram matrix ``M M^T`` of an ``M`` of ``shape`` ``(m, n)``, ``m <= n``,
    eigh; ``"tall"`` a tall ``M``, eigh of ``M^T M``.
    """
    op: str
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = "svd"
    shape: tuple[int, int] | None = None


# (build the matrix, k, recipe, name of the weight in use or None) -> its entry (see decompose), every rank <= k
SVDProvider = Callable[[Callable[[], torch.Tensor], int, Recipe, "str | None"], "dict[str, torch.Tensor]"]

EIG_VECTORS = torch.float32   # dtype of the eigenvectors U the auto solver keeps (see the module docstring)
SIGMA_FLOOR = 1e-8            # auto solver: smaller singular values (relative) are not balanced into B
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

    svdexp's choice (docs/protocol.md; SVD-LLM's reference code shifts by ``-lambda_min + 1e-6`` instead): a relative
    damping, grown until the factorisation succeeds, counted by callers.
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
        entry = provider(lambda: build().double(), k, recipe, _WEIGHT.get())
        return entry["U"][:, :k], entry["sigma"], entry["Vh"][:k]
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


def pinv_solve(M: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-10, solver: str = "svd") -> torch.Tensor:
    """``M^+ rhs`` for a symmetric PSD ``M`` (a Gram matrix of factors), robust to a singular ``M``.

    ``solver="svd"``: an SVD-based pseudo-inverse (the papers' path). ``"auto"``: a Cholesky solve when ``M`` is
    positive definite with a condition number below ``1 / rcond`` (the auto solver's factors are balanced, so
    their Grams are well conditioned; 5x faster for a 335 x 335 ``M``), else the pseudo-inverse from ``M``'s
    eigendecomposition.
    """
    M, rhs = M.double(), rhs.double()
    if solver == "auto":
        L, info = torch.linalg.cholesky_ex(M)
        d = L.diagonal()
        if int(info) == 0 and (d.min() / d.max()) ** 2 > rcond:     # cond(M) ~ (max d / min d)^2 < 1 / rcond
            return torch.cholesky_solve(rhs, L)
        return torch.linalg.pinv(M, rtol=rcond, hermitian=True) @ rhs
    return torch.linalg.pinv(M, rtol=rcond) @ rhs


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


def scaled(W: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> torch.Tensor:
    """``diag(left) W diag(right)`` in float64; ``None`` means no scaling on that side."""
    M = W.double()
    if left is not None:
        M = left.double()[:, None] * M
    if right is not None:
        M = M * right.double()[None, :]
    return M


def scaled_factors(W: torch.Tensor, k: int, left: torch.Tensor | None = None,
                   right: torch.Tensor | None = None, solver: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``diag(left) W diag(right)``, then ``A <- diag(left)^-1 A``, ``B <- B diag(right)^-1``.

    ``solver="auto"``: the same truncation by :func:`gram_truncation` (no ``diag(right)^-1``).

    The scaling vectors must be positive (see :func:`positive_floor`); ``None`` means no scaling on that side.
    ``W`` is the weight being compressed (its SVD may come from the provider, see :func:`thin_svd`).
    """
    if solver == "auto":
        return gram_truncation(W, k, Weighting(left=left, right=right))[:2]
    inputs = {side: v for side, v in (("left", left), ("right", right)) if v is not None}
    A, B = split_sqrt(*truncated_svd(lambda: scaled(W, left, right), k,
                                     Recipe("diag(left) W diag(right)", inputs)))
    if left is not None:
        A = A / left.double()[:, None]
    if right is not None:
        B = B / right.double()[None, :]
    return A, B


def solve_left_factor(W: torch.Tensor, B: torch.Tensor, H: torch.Tensor, solver: str = "svd") -> torch.Tensor:
    """Least-squares ``A`` for fixed ``B``: ``argmin_A ||(W - A B) X||_F = W H B^T (B H B^T)^+`` with ``H = X X^T``
    (``solver``: see :func:`pinv_solve`)."""
    W, B, H = W.double(), B.double(), H.double()
    HBt = H @ B.T                        # n x k
    G = B @ HBt                          # k x k, symmetric PSD
    # A = (W H B^T) G^+ = (G^+ (W H B^T)^T)^T since G^+ is symmetric
    return pinv_solve(G, (W @ HBt).T, solver=solver).T


def solve_right_factor(W: torch.Tensor, A: torch.Tensor, solver: str = "svd") -> torch.Tensor:
    """Least-squares ``B`` for fixed ``A``: ``(A^T A)^+ A^T W`` (``solver``: see :func:`pinv_solve`).

    It minimises ``||W - A B||_F`` and also ``||(W - A B) X||_F`` for every ``X`` (normal equations
    ``A^T (W - A B) H = 0`` hold whatever ``H``).
    """
    A = A.double()
    return pinv_solve(A.T @ A, A.T @ W.double(), solver=solver)


def activation_loss(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor) -> float:
    """``||(W - A B) X||_F^2 = tr((W - A B) H (W - A B)^T)`` with ``H = X X^T``."""
    E = W.double() - A.double() @ B.double()
    return float(((E @ H.double()) * E).sum())


# --- solver "auto": truncation from the Gram matrix of the smaller side -------------------------------------


def descending_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = Q diag(lam) Q^T`` for a symmetric PSD ``G``, ``lam`` descending and clipped at 0 (float64)."""
    lam, Q = torch.linalg.eigh(G.double())
    return lam.flip(0).clamp(min=0), Q.flip(1)


def psd_root(H: torch.Tensor) -> torch.Tensor:
    """A square root ``S S^T = H`` of a PSD ``H``, never inverted: its Cholesky factor when ``H`` is positive
    definite as is (the cheapest), else ``Q diag(lam)^1/2`` from its eigendecomposition (eigenvalues clipped at
    0; no damping)."""
    S, info = torch.linalg.cholesky_ex(H.double())
    if int(info) == 0:
        return S
    lam, Q = descending_eigh(H)
    return Q * lam.sqrt()


def vectors_to_keep(m: int, n: int, k: int) -> int:
    """Vectors a decomposition entry keeps: ``max(k, floor(m n / (m + n)))`` (no rank that saves parameters is
    larger, so one entry serves every ratio >= 0), at most ``min(m, n)``."""
    return min(max(k, m * n // (m + n)), m, n)


def decompose(recipe: Recipe, X: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What a provider keeps of the matrix ``X`` built by ``recipe`` (float64), enough for every rank up to
    :func:`vectors_to_keep`.

    ``svd``: ``X = M = U diag(sigma) V^T``: ``{U, sigma, Vh}``. ``gram``: ``X = M M^T = U diag(lam) U^T``:
    ``{U, lam}``. ``tall``: ``M^T M = V diag(lam) V^T``, ``U = M V diag(lam)^-1/2`` (zero where ``sigma ~ 0``):
    ``{U, lam}``. ``lam`` are the squared
    singular values of ``M``, ``U`` of the eigen kinds is kept in :data:`EIG_VECTORS`.
    """
    if recipe.kind == "svd":
        U, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
        keep = vectors_to_keep(*X.shape, k)
        return {"U": U[:, :keep].contiguous(), "sigma": sigma, "Vh": Vh[:keep].contiguous()}
    if recipe.kind == "gram":
        lam, U = descending_eigh(X)
        U = U[:, :vectors_to_keep(*recipe.shape, k)]
    elif recipe.kind == "tall":
        lam, V = descending_eigh(X.T @ X)
        keep = vectors_to_keep(*X.shape, k)
        sigma = lam[:keep].sqrt()
        live = sigma > SIGMA_FLOOR * sigma.max()
        U = (X @ V[:, :keep]) / torch.where(live, sigma, torch.ones_like(sigma))   # u_i = M v_i / sigma_i
        U[:, ~live] = 0.0           # no energy in X's directions: any u_i would do, none is kept
    else:
        raise ValueError(f"unknown decomposition kind {recipe.kind!r}")
    return {"U": U.to(EIG_VECTORS).contiguous(), "lam": lam}


def top_vectors(build: Callable[[], torch.Tensor], k: int, recipe: Recipe, reuse: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` vectors (float64) and every eigenvalue of the decomposition of what ``build`` makes as
    ``recipe`` says (kind ``gram``: eigenvectors of that Gram matrix; ``tall``: ``U_k`` of that ``M``); from the
    active provider when ``reuse`` (see :func:`thin_svd`)."""
    provider = _PROVIDER.get() if reuse else None
    if provider is not None:
        entry = provider(lambda: build().double(), k, recipe, _WEIGHT.get())
    else:
        entry = decompose(recipe, build().double(), k)
    return entry["U"][:, :k].double(), entry["lam"]


def projection_factors(W: torch.Tensor, U: torch.Tensor, lam: torch.Tensor, left: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of ``W' = diag(l)^-1 U U^T diag(l) W``: ``A = diag(l)^-1 U Sigma^1/2``,
    ``B = Sigma^-1/2 U^T diag(l) W`` with ``Sigma = lam^1/2``.

    ``A B`` does not depend on ``Sigma``: components with ``sigma <= SIGMA_FLOOR * sigma_1`` (rank-deficient
    ``M``, e.g. a singular ``H``) are split unbalanced, ``A = U``, ``B = U^T diag(l) W``, so nothing blows up.
    """
    sigma = lam.clamp(min=0).sqrt()
    live = sigma > SIGMA_FLOOR * sigma.max()
    root = torch.where(live, sigma, torch.ones_like(sigma)).sqrt()
    A, B = U * root, (U.T @ scaled(W, left)) / root[:, None]
    if left is not None:
        A = A / left.double()[:, None]
    return A, B


def right_projection_factors(W: torch.Tensor, V: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of ``W' = W V V^T`` (``V``: top right singular vectors of ``diag(l) W``):
    ``A = W V Sigma^-1/2``, ``B = Sigma^1/2 V^T`` (``= diag(l)^-1 U Sigma^1/2`` and ``Sigma^1/2 V^T``); components
    with ``sigma ~ 0`` unbalanced, as in :func:`projection_factors`."""
    sigma = lam.clamp(min=0).sqrt()
    live = sigma > SIGMA_FLOOR * sigma.max()
    root = torch.where(live, sigma, torch.ones_like(sigma)).sqrt()
    return (W.double() @ V) / root, root[:, None] * V.T


@dataclass(frozen=True)
class Weighting:
    """The norm ``||diag(l) (W - W') R||_F``, ``R R^T = H_R``, that :func:`gram_truncation` minimises: ``l = left``
    (``None``: 1); ``H_R`` is ``I``, ``diag(right)^2`` or ``H`` (then ``R = root()``, by default :func:`psd_root`,
    built only for a tall ``W``); ``C_out = W H W^T`` (the Gram of the outputs, measured) replaces ``W H W^T``."""
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    H: torch.Tensor | None = None
    root: Callable[[], torch.Tensor] | None = None
    C_out: torch.Tensor | None = None


def gram_truncation(W: torch.Tensor, k: int, weighting: Weighting = Weighting(), reuse: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solver ``auto``: ``min_{rank k} ||diag(l) (W - W') R||_F`` with ``R R^T = H_R`` (``weighting``, see
    :class:`Weighting`), without ``R^-1``: ``W' = diag(l)^-1 U_k U_k^T diag(l) W``, ``U_k`` the top-``k`` left
    singular vectors of ``M = diag(l) W R``.

    ``U_k``: for ``m <= n`` eigenvectors of ``C = M M^T = diag(l) W H_R W^T diag(l)`` (or ``C_out``); for
    ``m > n`` ``M V_k Sigma_k^-1``, ``V_k`` eigenvectors of ``M^T M``, except with ``H_R = I`` (svd; fwsvd's row
    scaling), where ``W' = W V_k V_k^T`` needs no ``U_k`` (:func:`right_projection_factors`). Returns ``A, B``
    (:func:`projection_factors`) and every eigenvalue ``lam`` (squared singular values of ``M``: the discarded
    ones sum to the truncation loss).

    ``reuse``: ``W`` is the weight being compressed, so the decomposition may come from the provider (see
    :func:`thin_svd`); ``False`` for anything else, e.g. a residual that depends on the rank.
    """
    left, right, H, root, C_out = weighting.left, weighting.right, weighting.H, weighting.root, weighting.C_out
    m, n = W.shape
    inputs = {name: t for name, t in (("left", left), ("right", right), ("H", H), ("C_out", C_out))
              if t is not None}
    if C_out is not None:
        recipe, build = Recipe("eig C_out", inputs, "gram", (m, n)), lambda: C_out
    elif m <= n:
        def build() -> torch.Tensor:
            M = scaled(W, left, right)
            return M @ M.T if H is None else M @ (H.double() @ M.T)
        recipe = Recipe("eig M M^T", inputs, "gram", (m, n))
    elif H is None and right is None:
        # tall M = diag(l) W: U_k U_k^T M = M V_k V_k^T, so W' = W V_k V_k^T; no QR, and V_k (n x k) is kept
        def build() -> torch.Tensor:
            M = scaled(W, left)
            return M.T @ M
        V, lam = top_vectors(build, k, Recipe("eig M^T M (V)", inputs, "gram", (m, n)), reuse)
        return (*right_projection_factors(W, V, lam[:k]), lam)
    else:
        def build() -> torch.Tensor:
            M = scaled(W, left, right)
            return M if H is None else M @ (root() if root is not None else psd_root(H))
        recipe = Recipe("eig M^T M", inputs, "tall")
    U, lam = top_vectors(build, k, recipe, reuse)
    return (*projection_factors(W, U, lam[:k], left), lam)
