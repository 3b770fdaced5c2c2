"""The whitened spectrum of every targeted matrix, for the matrix-level policies (:data:`~svdexp.allocation.SPECTRAL`).

Each matrix is decomposed exactly as SVD-LLM's ``auto`` solver decomposes it (:func:`~svdexp.methods.linalg.
gram_truncation` with :func:`~svdexp.methods.svd_llm.whitening`: ``C_out`` where it was collected, else ``H``), at
the break-even rank, inside the run's SVD provider and under the weight's name: the decomposition is the same entry
(same recipe, same statistics) that the compression of svd_llm, adasvd or ressvd (``solver=auto``) asks for
afterwards, which then reads it from the cache instead of decomposing again.

``first_order``: also ``dL_i = -u_i^T G W^T u_i`` of the kept components, ``G`` the summed loss gradient (the
statistic ``grad``). From the balanced factors ``A = U Sigma^1/2``, ``B = Sigma^-1/2 U^T W`` this is
``-(A^T G)_i . B_i`` (the ``Sigma`` cancel), so the vectors need not be unbalanced.
"""

from __future__ import annotations

import torch

from svdexp.allocation import Spectrum, break_even
from svdexp.compression.calibration import MatrixStats
from svdexp.compression.compress import site_stats
from svdexp.compression.statistics import RunStatistics
from svdexp.context import RunContext
from svdexp.methods.linalg import gram_truncation, weight_in_use
from svdexp.methods.svd_llm import whitening
from svdexp.models.decoder import weight_matrix


def matrix_spectrum(W: torch.Tensor, stats: MatrixStats, first_order: bool) -> Spectrum:
    """The whitened spectrum of ``W`` (float64) with its statistics ``stats`` (``C_out`` or ``H``; ``grad``)."""
    A, B, lam = gram_truncation(W, break_even(*W.shape), whitening(stats))
    if not first_order:
        return Spectrum(lam.cpu())
    G = stats["grad"].double()
    head = -((A.T @ G) * B).sum(dim=1)
    return Spectrum(lam.cpu(), head.cpu(), float(-(G * W).sum()))


def whitened_spectra(ctx: RunContext, stats: RunStatistics, first_order: bool = False) -> dict[str, Spectrum]:
    """Matrix name -> :class:`~svdexp.allocation.Spectrum` of every targeted matrix of the dense ``ctx.model``,
    one layer's statistics in memory at a time."""
    spectra: dict[str, Spectrum] = {}
    for index, layer in enumerate(ctx.decoder.layers(ctx.model)):
        prefix = ctx.decoder.layer_prefix(index)
        with stats.policy_layer(index) as original:
            sites = {site: site_stats(original, None, "original", site, ctx.device)
                     for site in (*ctx.decoder.sites(index), *ctx.decoder.targets(index))}
            for site, names in ctx.decoder.sites(index).items():
                for t in names:
                    W = weight_matrix(layer.get_submodule(t)).detach().to(device=ctx.device, dtype=torch.float64)
                    own = dict(sites[t].tensors) if t in sites else {}
                    with weight_in_use(f"{prefix}.{t}"):
                        spectra[f"{prefix}.{t}"] = matrix_spectrum(W, MatrixStats(sites[site], own), first_order)
            del sites, original
    return spectra
