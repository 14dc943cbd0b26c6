"""Mixup over the batch (Zhang et al., 2018) for metric learning.

With lambda ~ Beta(a, a) and a random permutation pi of the batch, the mixed
batch is lambda * x + (1 - lambda) * x[pi], and the training loss is

    L(x, y) + lambda * L(mix, y) + (1 - lambda) * L(mix, y[pi])

Mixing happens on the images ("input": the model embeds the mixed images,
so the uncertainty head learns what an ambiguous image looks like) or on the
embeddings ("embedding": no second forward pass).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sample_mixup(
    batch_size: int, alpha: float, rng: np.random.Generator
) -> tuple[float, torch.Tensor]:
    """Draw lambda ~ Beta(alpha, alpha) and a permutation of the batch (int64, (batch_size,))."""
    lam = float(rng.beta(alpha, alpha))
    return lam, torch.from_numpy(rng.permutation(batch_size)).long()


def mix_images(images: torch.Tensor, lam: float, permutation: torch.Tensor) -> torch.Tensor:
    """lam * images + (1 - lam) * images[permutation], for float images (n, 3, H, W)."""
    return lam * images + (1.0 - lam) * images[permutation]


def mix_embeddings(
    embeddings: torch.Tensor,
    uncertainty: torch.Tensor,
    lam: float,
    permutation: torch.Tensor,
    *,
    normalize_uncertainty: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix embeddings (n, d) and uncertainty (n, du); the mixed embeddings are re-normalised.

    `normalize_uncertainty` re-normalises the mixed uncertainty too, for a
    model whose uncertainty head L2-normalises.
    """
    mixed = F.normalize(lam * embeddings + (1.0 - lam) * embeddings[permutation], dim=1)
    mixed_uncertainty = lam * uncertainty + (1.0 - lam) * uncertainty[permutation]
    if normalize_uncertainty:
        mixed_uncertainty = F.normalize(mixed_uncertainty, dim=1)
    return mixed, mixed_uncertainty
