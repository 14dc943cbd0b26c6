"""Introspective distance and confidence against plain-loop references."""

import math

import numpy as np
import pytest

from index.scoring import (
    LABEL_VOTE_TEMPERATURE,
    Calibration,
    MetricSpec,
    confidence_features,
    introspective_distance,
    pair_beta,
    rerank_order,
    top_candidate_mask,
    uncertainty_scalar,
)


def reference_distance(mu_q, mu_i, beta, shift, scale):
    alpha = sum((a - b) ** 2 for a, b in zip(mu_q, mu_i))
    alpha = max(alpha, 1e-6)
    return alpha * math.exp(-(beta + shift) / (scale * alpha))


@pytest.mark.parametrize("beta_form", ["sum", "diff"])
def test_distance_matches_loop(beta_form):
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(6, 5))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    u = np.abs(rng.normal(size=(6, 3))) * 0.5
    spec = MetricSpec(beta_form=beta_form, shift=4.0, scale=5.0)
    query, items = 0, np.arange(1, 6)
    similarity = mu[items] @ mu[query]
    if beta_form == "sum":
        beta = pair_beta(spec, uncertainty_scalar(u[[query]])[0], uncertainty_scalar(u[items]))
    else:
        beta = pair_beta(spec, u[query], u[items])
    got = introspective_distance(similarity, beta, spec)
    for j, item in enumerate(items):
        if beta_form == "sum":
            expected_beta = sum(v * v for v in u[query]) + sum(v * v for v in u[item])
        else:
            expected_beta = sum((a - b) ** 2 for a, b in zip(u[query], u[item]))
        expected = reference_distance(mu[query], mu[item], expected_beta, 4.0, 5.0)
        assert got[j] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_distance_monotone_in_similarity_and_shrinks_with_beta():
    spec = MetricSpec(beta_form="sum", shift=4.0, scale=5.0)
    similarity = np.linspace(-1, 0.99, 50)
    distance = introspective_distance(similarity, np.zeros(50), spec)
    assert np.all(np.diff(distance) < 0)
    more_uncertain = introspective_distance(similarity, np.ones(50), spec)
    assert np.all(more_uncertain < distance)


def test_identical_embeddings_have_zero_distance():
    spec = MetricSpec(beta_form="sum", shift=4.0, scale=5.0)
    assert introspective_distance(np.array([1.0]), np.array([0.0]), spec)[0] == pytest.approx(0.0, abs=1e-12)


def test_rerank_order_breaks_ties_by_similarity():
    order = rerank_order(np.array([0.5, 0.1, 0.5]), np.array([0.2, 0.9, 0.3]))
    assert list(order) == [1, 2, 0]


def test_top_margin_positive_only_for_winner():
    features = confidence_features(
        np.array([0.9, 0.7, 0.4]), np.zeros(3), 0.1, np.zeros(3), names=("top_margin",)
    )
    assert features[:, 0] == pytest.approx([0.2, -0.2, -0.5])


def test_calibration_roundtrip_and_monotone():
    calibration = Calibration(
        features=("similarity",),
        mean=np.array([0.5]),
        std=np.array([0.1]),
        coef=np.array([2.0]),
        intercept=0.0,
    )
    restored = Calibration.from_json(calibration.to_json())
    probabilities = restored.predict(np.array([[0.3], [0.5], [0.7]]))
    assert probabilities[1] == pytest.approx(0.5)
    assert probabilities[0] < probabilities[1] < probabilities[2]


def test_unknown_feature_rejected():
    with pytest.raises(ValueError, match="unknown confidence feature"):
        confidence_features(np.zeros(2), np.zeros(2), 0.0, np.zeros(2), names=("nope",))


def test_label_margin_ignores_same_label():
    similarity = np.array([0.9, 0.85, 0.6])
    features = confidence_features(
        similarity, np.zeros(3), 0.0, np.zeros(3), names=("label_margin",), labels=["a", "a", "b"]
    )
    assert features[:, 0] == pytest.approx([0.3, 0.25, -0.3])


def test_label_margin_single_label_uses_minus_one():
    features = confidence_features(
        np.array([0.5, 0.4]), np.zeros(2), 0.0, np.zeros(2), names=("label_margin",), labels=["a", "a"]
    )
    assert features[:, 0] == pytest.approx([1.5, 1.4])


def test_label_support_counts_neighbours():
    similarity = np.linspace(1.0, 0.0, 12)
    labels = ["a"] * 3 + ["b"] * 9
    features = confidence_features(
        similarity, np.zeros(12), 0.0, np.zeros(12), names=("label_support",), labels=labels
    )
    assert features[0, 0] == pytest.approx(0.3)
    assert features[5, 0] == pytest.approx(0.7)


def test_no_labels_means_each_candidate_alone():
    similarity = np.array([0.9, 0.7, 0.4])
    with_ids = confidence_features(similarity, np.zeros(3), 0.0, np.zeros(3), labels=["x", "y", "z"])
    without = confidence_features(similarity, np.zeros(3), 0.0, np.zeros(3))
    np.testing.assert_allclose(with_ids, without)


def test_log_rank_follows_similarity():
    features = confidence_features(
        np.array([0.2, 0.9, 0.5]), np.zeros(3), 0.0, np.zeros(3), names=("log_rank",)
    )
    assert features[:, 0] == pytest.approx(np.log1p([2, 0, 1]))


def test_label_count_mismatch_rejected():
    with pytest.raises(ValueError, match="labels has 1 entries"):
        confidence_features(np.zeros(2), np.zeros(2), 0.0, np.zeros(2), labels=["a"])


def test_label_vote_matches_loop():
    rng = np.random.default_rng(3)
    similarity = rng.uniform(0.5, 0.9, 12)
    labels = rng.choice(["a", "b", "c"], 12)
    (vote,) = confidence_features(similarity, similarity, 1.0, np.ones(12), ("label_vote",), labels=labels).T

    weights = [math.exp((value - similarity.max()) / LABEL_VOTE_TEMPERATURE) for value in similarity]
    for i in range(12):
        own = sum(weight for weight, label in zip(weights, labels) if label == labels[i])
        assert vote[i] == pytest.approx(own / sum(weights))
    assert vote[np.argmax(similarity)] > 0.0


def test_label_vote_agreement_and_outsider():
    similarity = np.array([0.9, 0.89, 0.5])
    (vote,) = confidence_features(similarity, similarity, 1.0, np.ones(3), ("label_vote",),
                                  labels=["x", "x", "y"]).T
    assert vote[0] == pytest.approx(vote[1])
    assert vote[0] > 0.999
    assert vote[2] < 1e-6


def test_top_candidate_mask_per_row():
    similarity = np.array([[0.2, 0.9, 0.9], [0.5, 0.1, 0.3]])
    np.testing.assert_array_equal(top_candidate_mask(similarity), [[False, True, False], [True, False, False]])
    np.testing.assert_array_equal(top_candidate_mask(np.array([0.1, 0.7])), [False, True])
    assert top_candidate_mask(np.zeros((0,))).shape == (0,)


def test_top_model_scores_masked_rows():
    shared = Calibration(("similarity",), np.zeros(1), np.ones(1), np.array([4.0]), 0.0)
    top = Calibration(("similarity",), np.zeros(1), np.ones(1), np.array([-4.0]), 0.0)
    both = Calibration(("similarity",), np.zeros(1), np.ones(1), np.array([4.0]), 0.0, top=top)
    features = np.array([[1.0], [1.0]])
    mask = np.array([True, False])

    probability = both.predict(features, top=mask)
    assert probability[0] == pytest.approx(top.predict(features[:1])[0])
    assert probability[1] == pytest.approx(shared.predict(features[1:])[0])
    np.testing.assert_array_equal(both.predict(features), shared.predict(features))  # no mask: shared model
    restored = Calibration.from_json(both.to_json())
    np.testing.assert_array_equal(restored.predict(features, top=mask), probability)
    with pytest.raises(ValueError, match="top mask"):
        both.predict(features, top=np.array([True]))


def test_identity_feature_grows_towards_a_copy():
    similarity = np.array([1.0, 0.9, 0.5])
    (identity,) = confidence_features(similarity, similarity, 1.0, np.ones(3), ("identity",)).T
    np.testing.assert_allclose(identity, [-math.log(1e-4), -math.log(0.1), -math.log(0.5)], rtol=1e-6)
