"""Proxy Anchor loss (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020).

With one proxy p per class, similarities s(x, p), scale a and margin m:

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-a (s(x, p) - m)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( a (s(x, p) + m)))

P is every proxy, P+ the proxies of the classes present in the batch, X_p+
the batch embeddings of p's class and X_p- the others. `ProxyAnchorLoss`
owns the proxies and, for the introspective variants, the proxy uncertainty.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig
from training.losses.similarity import (
    authors_similarity,
    cosine_similarity,
    introspective_similarity,
    pair_beta_diff,
    pair_beta_sum,
)


def proxy_anchor_from_similarity(
    similarity: torch.Tensor, labels: torch.Tensor, *, scale: float, margin: float
) -> torch.Tensor:
    """Proxy Anchor loss from a similarity matrix (n, C) and int64 labels (n,) in [0, C).

    log(1 + sum exp(.)) is computed as a logsumexp with an extra zero term, so
    large scales do not overflow. Returns a scalar.
    """
    num_classes = similarity.shape[1]
    positive = F.one_hot(labels, num_classes).bool()
    zeros = similarity.new_zeros(1, num_classes)
    minus_inf = torch.full_like(similarity, -math.inf)

    positive_logits = torch.where(positive, -scale * (similarity - margin), minus_inf)
    negative_logits = torch.where(positive, minus_inf, scale * (similarity + margin))
    positive_terms = torch.logsumexp(torch.cat([zeros, positive_logits]), dim=0)
    negative_terms = torch.logsumexp(torch.cat([zeros, negative_logits]), dim=0)

    present = positive.any(dim=0)
    positive_loss = positive_terms[present].sum() / present.sum().clamp_min(1)
    negative_loss = negative_terms.sum() / num_classes
    return positive_loss + negative_loss


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class ProxyAnchorLoss(nn.Module):
    """Proxy Anchor loss on the similarity that `config.name` selects.

    - proxy_anchor, proxy_anchor_mixup: cosine similarity.
    - idml_authors: `authors_similarity` with beta = ||u_x||^2 (zero proxy uncertainty).
    - idml: `introspective_similarity` with normalised proxies and beta from
      `config.beta_form` and `config.proxy_uncertainty`.

    forward(embeddings (n, d) unit rows, uncertainty (n, du), labels (n,) int64) -> scalar.
    """

    def __init__(self, config: LossConfig, *, num_classes: int, embedding_dim: int, uncertainty_dim: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Proxy Anchor needs at least 2 classes, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

        # Proxy uncertainty: (C,) scalars ||u_p||^2 for "sum", (C, du) vectors u_p for "diff".
        shape = (num_classes,) if config.beta_form == "sum" else (num_classes, uncertainty_dim)
        self.learns_proxy_uncertainty = config.name == "idml" and config.proxy_uncertainty == "learned"
        if self.learns_proxy_uncertainty and config.beta_form == "sum":
            # softplus keeps ||u_p||^2 positive; it starts at proxy_uncertainty_init.
            start = _inverse_softplus(config.proxy_uncertainty_init)
            self.proxy_uncertainty_raw = nn.Parameter(torch.full(shape, start))
        elif self.learns_proxy_uncertainty:
            # u_p starts at 0, so beta starts at ||u_x||^2 as in the original code.
            self.proxy_uncertainty_raw = nn.Parameter(torch.zeros(shape))
        else:
            self.register_buffer("proxy_uncertainty_raw", torch.zeros(shape))

    def proxy_uncertainty(self) -> torch.Tensor:
        """||u_p||^2 per proxy (C,) for beta_form "sum", or u_p (C, du) for "diff"."""
        if self.learns_proxy_uncertainty and self.config.beta_form == "sum":
            return F.softplus(self.proxy_uncertainty_raw)
        return self.proxy_uncertainty_raw

    def similarity(
        self, embeddings: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Similarity of every embedding to every proxy, (n, C).

        `labels` (n,) is needed when `config.uncertainty_scope` is "positive".
        """
        config = self.config
        if config.name in ("proxy_anchor", "proxy_anchor_mixup"):
            return cosine_similarity(embeddings, self.proxies)
        if config.name == "idml_authors":
            zero = uncertainty.new_zeros(self.num_classes)
            beta = pair_beta_sum(uncertainty, zero)
            return authors_similarity(
                embeddings, self.proxies, beta, shift=config.metric_shift, scale=config.metric_scale
            )
        if config.beta_form == "sum":
            beta = pair_beta_sum(uncertainty, self.proxy_uncertainty())
        else:
            beta = pair_beta_diff(uncertainty, self.proxy_uncertainty())
        if config.uncertainty_scope == "positive":
            if labels is None:
                raise ValueError("uncertainty_scope 'positive' needs the labels of the embeddings")
            beta = beta * F.one_hot(labels, self.num_classes).to(beta.dtype)
        return introspective_similarity(
            embeddings, self.proxies, beta, shift=config.metric_shift, scale=config.metric_scale
        )

    def forward(
        self, embeddings: torch.Tensor, uncertainty: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        similarity = self.similarity(embeddings, uncertainty, labels)
        loss = proxy_anchor_from_similarity(
            similarity, labels, scale=self.config.scale, margin=self.config.margin
        )
        if self.config.name == "idml" and self.config.uncertainty_penalty > 0:
            loss = loss + self.config.uncertainty_penalty * (uncertainty * uncertainty).sum(dim=1).mean()
        return loss
