"""Losses against slow plain-Python references on tiny seeded float64 inputs.

Tolerance: 1e-9 relative, since both sides compute in float64 and differ only
in summation order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from index.scoring import MetricSpec, introspective_distance
from training.config import LossConfig
from training.losses import build_loss, metric_spec, mix_embeddings, mix_images, sample_mixup
from training.losses.proxy_anchor import proxy_anchor_from_similarity

RTOL = 1e-9
N, C, D, DU = 7, 5, 6, 3


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N, D, generator=generator, dtype=torch.float64), dim=1)
    u = F.softplus(torch.randn(N, DU, generator=generator, dtype=torch.float64)) * 0.5
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4])  # class 3 is absent from the batch
    return x, u, labels


def _loss(name: str, seed: int = 0, **overrides):
    config = LossConfig(name=name, **overrides)
    torch.manual_seed(seed)
    loss = build_loss(config, num_classes=C, embedding_dim=D, uncertainty_dim=DU).double()
    with torch.no_grad():
        # Proxies of assorted norms, so that normalising them matters.
        loss.proxies.mul_(torch.linspace(0.5, 3.0, C, dtype=torch.float64).view(-1, 1))
        if loss.learns_proxy_uncertainty:
            loss.proxy_uncertainty_raw.copy_(
                torch.rand(loss.proxy_uncertainty_raw.shape, dtype=torch.float64) - 0.5
            )
    return loss


# Plain-Python references -----------------------------------------------------


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _norm(a):
    return math.sqrt(_dot(a, a))


def _reference_similarity(name, x, u, proxies, proxy_uncertainty, config, labels=None):
    rows = []
    for i in range(len(x)):
        row = []
        for c in range(len(proxies)):
            p = proxies[c]
            p_hat = [value / _norm(p) for value in p]
            cosine = _dot(x[i], p_hat)
            if name in ("proxy_anchor", "proxy_anchor_mixup"):
                row.append(cosine)
                continue
            if name == "idml_authors":
                alpha = max(sum((a - b) ** 2 for a, b in zip(x[i], p)), 1e-6)
                beta = _dot(u[i], u[i])
                row.append(1 - (1 - cosine) * math.exp(-(beta + 4.0) / (5.0 * alpha)))
                continue
            alpha = max(sum((a - b) ** 2 for a, b in zip(x[i], p_hat)), 1e-6)
            if config.beta_form == "sum":
                beta = _dot(u[i], u[i]) + proxy_uncertainty[c]
            else:
                beta = sum((a - b) ** 2 for a, b in zip(u[i], proxy_uncertainty[c]))
            if config.uncertainty_scope == "positive" and labels[i] != c:
                beta = 0.0
            distance = alpha * math.exp(-(beta + config.metric_shift) / (config.metric_scale * alpha))
            row.append(1 - distance / 2)
        rows.append(row)
    return rows


def _reference_proxy_anchor(similarity, labels, scale, margin):
    num_classes = len(similarity[0])
    present = sorted(set(labels))
    positive = 0.0
    for c in present:
        total = sum(
            math.exp(-scale * (similarity[i][c] - margin)) for i in range(len(labels)) if labels[i] == c
        )
        positive += math.log(1 + total)
    negative = 0.0
    for c in range(num_classes):
        total = sum(
            math.exp(scale * (similarity[i][c] + margin)) for i in range(len(labels)) if labels[i] != c
        )
        negative += math.log(1 + total)
    return positive / len(present) + negative / num_classes


# Tests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("proxy_anchor", {}),
        ("proxy_anchor_mixup", {}),
        ("idml_authors", {}),
        ("idml", {"beta_form": "sum", "proxy_uncertainty": "learned"}),
        ("idml", {"beta_form": "sum", "proxy_uncertainty": "zero"}),
        ("idml", {"beta_form": "diff", "proxy_uncertainty": "learned"}),
        ("idml", {"beta_form": "diff", "proxy_uncertainty": "zero"}),
        ("idml", {"uncertainty_scope": "positive"}),
        ("idml", {"uncertainty_scope": "positive", "uncertainty_penalty": 0.5}),
        ("idml", {"beta_form": "diff", "uncertainty_scope": "positive", "uncertainty_penalty": 0.5}),
    ],
)
def test_loss_matches_reference(name, overrides):
    x, u, labels = _inputs()
    loss = _loss(name, **overrides)
    proxy_uncertainty = loss.proxy_uncertainty().detach().tolist()

    similarity = loss.similarity(x, u, labels)
    expected_similarity = _reference_similarity(
        name, x.tolist(), u.tolist(), loss.proxies.detach().tolist(), proxy_uncertainty, loss.config,
        labels.tolist(),
    )
    np.testing.assert_allclose(similarity.detach().numpy(), expected_similarity, rtol=RTOL)

    value = loss(x, u, labels)
    expected = _reference_proxy_anchor(expected_similarity, labels.tolist(), 32.0, 0.1)
    if name == "idml":
        penalty = loss.config.uncertainty_penalty
        expected += penalty * sum(_dot(row, row) for row in u.tolist()) / len(u)
    assert value.item() == pytest.approx(expected, rel=RTOL)


def test_proxy_anchor_large_scale_is_finite():
    similarity = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0])  # every pair on the wrong side
    value = proxy_anchor_from_similarity(similarity, labels, scale=1000.0, margin=0.1)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(similarity.grad).all()


def test_idml_similarity_matches_serving_distance():
    """Training's 1 - D / 2 uses the same D as index.scoring for the same cos and beta."""
    x, u, _ = _inputs(seed=1)
    loss = _loss("idml", beta_form="sum", proxy_uncertainty="learned")
    similarity = loss.similarity(x, u).detach().numpy()

    proxies = F.normalize(loss.proxies.detach(), dim=1)
    cosine = (x @ proxies.t()).numpy()
    beta = (u * u).sum(1, keepdim=True).numpy() + loss.proxy_uncertainty().detach().numpy()[None, :]
    spec = metric_spec(loss.config)
    assert spec == MetricSpec(beta_form="sum", shift=4.0, scale=5.0)
    for i in range(N):
        distance = introspective_distance(cosine[i], beta[i], spec)
        # index.scoring returns float32, so compare at float32 precision.
        np.testing.assert_allclose(2 * (1 - similarity[i]), distance, rtol=1e-6, atol=1e-6)


def test_idml_ignores_proxy_norm():
    x, u, labels = _inputs()
    loss = _loss("idml")
    before = loss(x, u, labels).item()
    with torch.no_grad():
        loss.proxies.mul_(7.0)
    assert loss(x, u, labels).item() == pytest.approx(before, rel=RTOL)


def test_authors_loss_depends_on_proxy_norm():
    x, u, labels = _inputs()
    loss = _loss("idml_authors")
    before = loss(x, u, labels).item()
    with torch.no_grad():
        loss.proxies.mul_(7.0)
    assert loss(x, u, labels).item() != pytest.approx(before, rel=1e-3)


def test_idml_gives_uncertainty_gradient():
    x, u, labels = _inputs()
    u.requires_grad_(True)
    loss = _loss("idml")
    loss(x, u, labels).backward()
    assert u.grad.abs().max() > 1e-6
    assert loss.proxy_uncertainty_raw.grad.abs().max() > 1e-6


def test_authors_uncertainty_head_gets_no_gradient():
    """With u = normalize(W f) and zero proxy uncertainty, beta = 1 and W learns nothing."""
    x, _, labels = _inputs()
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(N, 10, generator=generator, dtype=torch.float64)
    weight = torch.randn(DU, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    u = F.normalize(features @ weight.t(), dim=1)
    loss = _loss("idml_authors")
    loss(x, u, labels).backward()
    assert weight.grad.abs().max() < 1e-12


def test_zero_proxy_uncertainty_is_not_a_parameter():
    loss = _loss("idml", proxy_uncertainty="zero")
    assert "proxy_uncertainty_raw" not in dict(loss.named_parameters())
    assert loss.proxy_uncertainty().abs().max() == 0


def test_learned_proxy_uncertainty_starts_at_init():
    loss = build_loss(
        LossConfig(name="idml", proxy_uncertainty_init=0.25), num_classes=C, embedding_dim=D,
        uncertainty_dim=DU,
    )
    np.testing.assert_allclose(loss.proxy_uncertainty().detach().numpy(), 0.25, rtol=1e-6)


def test_loss_rejects_one_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_loss(LossConfig(), num_classes=1, embedding_dim=D, uncertainty_dim=DU)


def test_mixup_defaults_per_loss():
    assert not LossConfig(name="proxy_anchor").uses_mixup
    assert LossConfig(name="proxy_anchor_mixup").uses_mixup
    assert LossConfig(name="idml_authors").uses_mixup
    assert LossConfig(name="idml").uses_mixup
    assert not LossConfig(name="idml", mixup=False).uses_mixup


def test_sample_mixup_is_seeded():
    first = sample_mixup(6, 1.0, np.random.default_rng(5))
    second = sample_mixup(6, 1.0, np.random.default_rng(5))
    assert first[0] == second[0]
    assert 0.0 <= first[0] <= 1.0
    assert torch.equal(first[1], second[1])
    assert sorted(first[1].tolist()) == list(range(6))


def test_mix_images_interpolates():
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    permutation = torch.tensor([1, 0])
    mixed = mix_images(images, 0.25, permutation)
    torch.testing.assert_close(mixed[0], 0.25 * images[0] + 0.75 * images[1])
    torch.testing.assert_close(mixed[1], 0.25 * images[1] + 0.75 * images[0])


def test_mix_embeddings_renormalises():
    x, u, _ = _inputs()
    permutation = torch.arange(N).flip(0)
    mixed, mixed_u = mix_embeddings(x, u, 0.3, permutation, normalize_uncertainty=False)
    np.testing.assert_allclose(mixed.norm(dim=1).numpy(), 1.0, rtol=1e-12)
    torch.testing.assert_close(mixed_u, 0.3 * u + 0.7 * u[permutation])
    _, unit_u = mix_embeddings(x, u, 0.3, permutation, normalize_uncertainty=True)
    np.testing.assert_allclose(unit_u.norm(dim=1).numpy(), 1.0, rtol=1e-12)
