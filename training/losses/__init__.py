"""Losses: Proxy Anchor on cosine or introspective similarities, and batch mixup."""

from __future__ import annotations

from index.scoring import MetricSpec
from training.config import LossConfig
from training.losses.mixup import mix_embeddings, mix_images, sample_mixup
from training.losses.proxy_anchor import ProxyAnchorLoss, proxy_anchor_from_similarity


def build_loss(
    config: LossConfig, *, num_classes: int, embedding_dim: int, uncertainty_dim: int
) -> ProxyAnchorLoss:
    """Build the loss module (with its proxies) that `config` describes."""
    return ProxyAnchorLoss(
        config, num_classes=num_classes, embedding_dim=embedding_dim, uncertainty_dim=uncertainty_dim
    )


def metric_spec(config: LossConfig) -> MetricSpec:
    """Return the introspective distance constants of `config` in the form `index.scoring` serves them."""
    return MetricSpec(beta_form=config.beta_form, shift=config.metric_shift, scale=config.metric_scale)


__all__ = [
    "ProxyAnchorLoss",
    "build_loss",
    "metric_spec",
    "mix_embeddings",
    "mix_images",
    "proxy_anchor_from_similarity",
    "sample_mixup",
]
