"""Similarities between embeddings and class proxies: cosine and introspective.

Shapes: embeddings x (n, d), L2-normalised; proxies p (C, d); uncertainty
embeddings u (n, du); the result is (n, C). Everything is differentiable.

The introspective distance has the same formula and constants as
`index.scoring.introspective_distance`, which the server ranks with:

    alpha = ||x - p||^2                  (2 - 2 cos(x, p) for unit vectors)
    D     = alpha * exp(-(beta + shift) / (scale * alpha))
    s     = 1 - D / 2                    (equals cos(x, p) when beta + shift = 0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from index.scoring import ALPHA_EPS


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Expanded ||a - b||^2; torch.cdist's gradient is NaN where a row equals b's row.
    squared = (a * a).sum(dim=1, keepdim=True) + (b * b).sum(dim=1).view(1, -1) - 2.0 * a @ b.t()
    return squared.clamp_min(0.0)


def cosine_similarity(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """cos(x, p) for unit-norm embeddings (n, d) and any proxies (C, d); (n, C)."""
    return embeddings @ F.normalize(proxies, dim=1).t()


def pair_beta_sum(uncertainty: torch.Tensor, proxy_uncertainty: torch.Tensor) -> torch.Tensor:
    """beta = ||u_x||^2 + b_p from u (n, du) and proxy scalars b_p = ||u_p||^2 (C,); (n, C)."""
    return (uncertainty * uncertainty).sum(dim=1, keepdim=True) + proxy_uncertainty.view(1, -1)


def pair_beta_diff(uncertainty: torch.Tensor, proxy_uncertainty: torch.Tensor) -> torch.Tensor:
    """beta = ||u_x - u_p||^2 from u (n, du) and proxy vectors u_p (C, du); (n, C), >= 0."""
    return _squared_distances(uncertainty, proxy_uncertainty)


def introspective_similarity(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    beta: torch.Tensor,
    *,
    shift: float,
    scale: float,
) -> torch.Tensor:
    """s = 1 - D / 2 against the normalised proxies; (n, C).

    Args:
        embeddings: (n, d), L2-normalised.
        proxies: (C, d), normalised here.
        beta: (n, C) pair uncertainty, >= 0.
    """
    cosine = cosine_similarity(embeddings, proxies)
    alpha = (2.0 - 2.0 * cosine).clamp_min(ALPHA_EPS)
    distance = alpha * torch.exp(-(beta + shift) / (scale * alpha))
    return 1.0 - distance / 2.0


def authors_similarity(
    embeddings: torch.Tensor,
    proxies: torch.Tensor,
    beta: torch.Tensor,
    *,
    shift: float,
    scale: float,
) -> torch.Tensor:
    """The original IDML code's similarity; (n, C).

    s = 1 - (1 - cos(x, p)) * exp(-(beta + shift) / (scale * alpha)) with
    alpha = ||x - p||^2 against the *unnormalised* proxy p, while x is unit
    norm, so alpha also depends on the proxy's norm.
    """
    cosine = cosine_similarity(embeddings, proxies)
    alpha = _squared_distances(embeddings, proxies).clamp_min(ALPHA_EPS)
    return 1.0 - (1.0 - cosine) * torch.exp(-(beta + shift) / (scale * alpha))
