"""Confidence calibration and serving-path measurements on seeded synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from index.scoring import Calibration, MetricSpec
from training.bundle_eval import (
    EmbeddedSplit,
    average_precision_at_r,
    calibration_candidates,
    calibration_metrics,
    check_protocol_for_kind,
    choose_scoring,
    measure_scoring,
    retrieval_metrics,
    score_candidates,
)
from training.calibrate import (
    ambiguity_threshold,
    expected_calibration_error,
    fit_calibration,
    fit_logistic,
    reliability_curve,
)
from training.metrics import nearest_neighbors


def naive_ece(probability, label, bins=15):
    total, n = 0.0, len(probability)
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i in range(n) if low <= probability[i] < high or (b == bins - 1 and probability[i] == 1.0)]
        if members:
            mean_p = sum(probability[i] for i in members) / len(members)
            mean_y = sum(label[i] for i in members) / len(members)
            total += len(members) / n * abs(mean_p - mean_y)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_loop(seed):
    rng = np.random.default_rng(seed)
    probability = rng.uniform(size=300)
    probability[:5] = [0.0, 1.0, 1 / 15, 14 / 15, 0.5]  # bin edges
    label = rng.uniform(size=300) < probability**2

    assert expected_calibration_error(probability, label) == pytest.approx(naive_ece(probability, label), abs=1e-12)


def test_ece_of_perfect_and_worst_predictions():
    label = np.array([0, 1, 0, 1, 1], bool)

    assert expected_calibration_error(label.astype(float), label) == 0.0
    assert expected_calibration_error(1.0 - label, label) == 1.0


def test_reliability_curve_counts_and_rates():
    probability = np.array([0.01, 0.02, 0.5, 0.51, 0.99])
    label = np.array([0, 0, 1, 0, 1])

    curve = reliability_curve(probability, label, bins=10)

    assert curve.count.tolist() == [2, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert curve.positive_rate[5] == 0.5
    assert curve.mean_probability[0] == pytest.approx(0.015)
    assert np.isnan(curve.positive_rate[1])


def synthetic_features(seed: int, n: int = 4000):
    """Features (n, 2) and labels drawn from P(y=1) = sigmoid(3 x0 - 2 x1 + 0.5)."""
    rng = np.random.default_rng(seed)
    features = np.stack([rng.normal(2.0, 0.5, n), rng.normal(-1.0, 2.0, n)], axis=1)
    true_probability = 1 / (1 + np.exp(-(3 * features[:, 0] - 2 * features[:, 1] + 0.5)))
    return features, rng.uniform(size=n) < true_probability, true_probability


def test_logistic_fit_recovers_known_relation():
    features, label, true_probability = synthetic_features(0)

    calibration = fit_logistic(features, label, ("similarity", "distance"))

    # Coefficients live on the standardised scale: undo it to compare with (3, -2).
    raw_coef = calibration.coef / calibration.std
    np.testing.assert_allclose(raw_coef, [3.0, -2.0], rtol=0.15)
    predicted = calibration.predict(features)
    assert np.abs(predicted - true_probability).mean() < 0.03
    assert expected_calibration_error(predicted, label) < 0.03


def test_fit_calibration_round_trips_through_json():
    features, label, _ = synthetic_features(1)
    query_ids = np.arange(len(label)) // 10

    fitted = fit_calibration(features, label, query_ids, ("similarity", "distance"))
    restored = Calibration.from_json(fitted.calibration.to_json())

    np.testing.assert_array_equal(restored.predict(features[:50]), fitted.calibration.predict(features[:50]))
    assert fitted.report["kind"] in ("logistic", "logistic+isotonic")
    assert fitted.report["holdout_queries"] == 120
    assert fitted.report["fit_ece"] < 0.03


def test_isotonic_step_fixes_miscalibrated_feature():
    # P(y) is a step in x: a logistic curve cannot follow it, the isotonic step can.
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, size=(6000, 1))
    label = rng.uniform(size=6000) < np.where(x[:, 0] > 0.7, 0.9, 0.05)
    query_ids = np.arange(6000) // 20

    fitted = fit_calibration(x, label, query_ids, ("similarity",))

    assert fitted.report["kind"] == "logistic+isotonic"
    assert fitted.report["holdout_ece_logistic_isotonic"] < fitted.report["holdout_ece_logistic"]
    probability = fitted.calibration.predict(np.array([[0.2], [0.9]]))
    assert probability[0] == pytest.approx(0.05, abs=0.03)
    assert probability[1] == pytest.approx(0.9, abs=0.03)


def test_fit_rejects_single_label_and_nan():
    features = np.zeros((20, 1))
    with pytest.raises(ValueError, match="both matching and non-matching"):
        fit_calibration(features, np.zeros(20, bool), np.arange(20), ("similarity",))
    features[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration(features, np.arange(20) % 2 == 0, np.arange(20), ("similarity",))


def test_constant_feature_gets_unit_std():
    features, label, _ = synthetic_features(3, n=500)
    features[:, 1] = 7.0

    calibration = fit_logistic(features, label, ("similarity", "query_uncertainty"))

    assert calibration.std[1] == 1.0
    assert np.isfinite(calibration.predict(features)).all()


def test_ambiguity_threshold_sits_at_quantile():
    values = np.arange(1, 101, dtype=float)

    record = ambiguity_threshold(values, 0.9)

    assert record["quantile"] == 0.9
    assert np.mean(values > record["threshold"]) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="quantile"):
        ambiguity_threshold(values, 1.0)


def clustered_split(seed: int, classes: int = 12, per_class: int = 4, noise: float = 0.6) -> EmbeddedSplit:
    """Unit embeddings around class centres; the uncertainty grows with each image's noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 16))
    scale = rng.uniform(0.2, 1.0, size=classes * per_class) * noise
    labels = np.repeat(np.arange(classes), per_class)
    embedding = centres[labels] + scale[:, None] * rng.normal(size=(classes * per_class, 16))
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    uncertainty = np.abs(rng.normal(size=(classes * per_class, 4))) * scale[:, None]
    return EmbeddedSplit(embedding.astype(np.float32), uncertainty.astype(np.float32), labels)


def naive_average_precision(order_labels, query_label, r):
    hits, total = 0, 0.0
    for i, label in enumerate(order_labels[:r], start=1):
        if label == query_label:
            hits += 1
            total += hits / i
    return total / r


@pytest.mark.parametrize("rerank", [False, True])
def test_reranked_map_matches_loop(rerank):
    split = clustered_split(4)
    similarity, index = nearest_neighbors(split.embedding, 20)
    metric = MetricSpec(beta_form="sum", shift=4.0, scale=5.0)

    lists = score_candidates(split, index, similarity, metric, rerank=rerank)

    expected = [
        naive_average_precision(split.labels[lists.index[q]], split.labels[q], 3) for q in range(len(split.labels))
    ]
    np.testing.assert_allclose(average_precision_at_r(lists.relevant, lists.relevant_count), expected)
    assert retrieval_metrics(lists)["map_at_r"] == pytest.approx(np.mean(expected))
    if rerank:
        assert (np.diff(lists.distance, axis=1) >= 0).all()
    else:
        assert (np.diff(lists.similarity, axis=1) <= 0).all()


def test_features_do_not_depend_on_order():
    split = clustered_split(5)
    similarity, index = nearest_neighbors(split.embedding, 15)
    metric = MetricSpec(beta_form="diff", shift=4.0, scale=5.0)

    plain = score_candidates(split, index, similarity, metric, rerank=False)
    reranked = score_candidates(split, index, similarity, metric, rerank=True)

    for query in range(len(split.labels)):
        by_item_plain = dict(zip(plain.index[query], map(tuple, plain.features[query])))
        by_item_reranked = dict(zip(reranked.index[query], map(tuple, reranked.features[query])))
        assert by_item_plain == by_item_reranked


def test_measure_and_choose_scoring():
    split = clustered_split(6, classes=30)

    rows = measure_scoring(split, shift=4.0, scale=5.0, candidates=20)
    choice = choose_scoring(rows)
    fixed = choose_scoring(rows, beta_form="diff", rerank="on")

    assert len(rows) == 4
    assert choice.beta_form in ("sum", "diff")
    assert isinstance(choice.rerank, bool)
    assert (fixed.beta_form, fixed.rerank) == ("diff", True)
    assert "_ap" not in choice.measurements["table"][0]
    no_rerank = [row for row in rows if not row["rerank"]]
    assert no_rerank[0]["map_at_r"] == no_rerank[1]["map_at_r"]  # beta only matters when reranking


def test_calibration_metrics_on_clustered_split():
    split = clustered_split(7, classes=40)
    similarity, index = nearest_neighbors(split.embedding, 30)
    lists = score_candidates(split, index, similarity, MetricSpec("sum", 4.0, 5.0), rerank=False)
    features = lists.features.reshape(-1, lists.features.shape[2])
    query_ids = np.repeat(np.arange(len(split.labels)), 30)
    fitted = fit_calibration(features, lists.relevant.reshape(-1), query_ids, lists.feature_names)

    metrics = calibration_metrics(lists, fitted.calibration, returned=10)

    assert metrics["results"] == len(split.labels) * 10
    assert 0.0 <= metrics["ece_returned"] < 0.1
    assert metrics["auroc_rank1"] > 0.5
    assert metrics["accuracy_rank1"] == pytest.approx(retrieval_metrics(lists)["recall_at_1"])


def scoring_rows(ap: dict, log_loss: dict) -> list[dict]:
    """`measure_scoring`-like rows from per-query AP@R and held-out log loss arrays."""
    rows = []
    for (beta_form, rerank), values in ap.items():
        rows.append({
            "beta_form": beta_form,
            "rerank": rerank,
            "map_at_r": float(np.mean(values)),
            "calibration": {"log_loss": float(np.mean(log_loss[beta_form]))},
            "_ap": np.asarray(values, float),
            "_log_loss": np.asarray(log_loss[beta_form], float),
        })
    return rows


BASE_AP = np.linspace(0.2, 0.8, 200)
NOISE = np.random.default_rng(8).normal(0, 0.05, 200)
FLAT_LOSS = {"sum": np.full(200, 0.3), "diff": np.full(200, 0.3) + NOISE / 100}


@pytest.mark.parametrize(
    ("sum_gain", "diff_gain", "expected"),
    [
        (0.0, 0.0, ("sum", False)),  # nothing changes: simplest setting
        (0.05, 0.05, ("sum", True)),  # both gain the same: sum is cheaper
        (0.0, 0.05, ("diff", True)),  # only diff gains
        (0.02, 0.08, ("diff", True)),  # diff gains clearly more than sum
        (0.001, 0.0, ("sum", False)),  # a gain inside the noise
    ],
)
def test_choose_scoring_rules(sum_gain, diff_gain, expected):
    ap = {
        ("sum", False): BASE_AP,
        ("sum", True): BASE_AP + sum_gain + NOISE,
        ("diff", False): BASE_AP,
        ("diff", True): BASE_AP + diff_gain + NOISE,
    }

    choice = choose_scoring(scoring_rows(ap, FLAT_LOSS))

    assert (choice.beta_form, choice.rerank) == expected


def test_choose_scoring_uses_log_loss_without_rerank():
    ap = {key: BASE_AP for key in [("sum", False), ("sum", True), ("diff", False), ("diff", True)]}
    better_diff = {"sum": np.full(200, 0.3) + np.abs(NOISE), "diff": np.full(200, 0.25) + np.abs(NOISE)}

    assert choose_scoring(scoring_rows(ap, better_diff)).beta_form == "diff"
    assert choose_scoring(scoring_rows(ap, FLAT_LOSS)).beta_form == "sum"


def test_isotonic_confidence_never_exactly_zero_or_one():
    # Perfectly separable labels drive plain isotonic blocks to exactly 0 and 1.
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(4000, 1))
    label = x[:, 0] > 0.5
    fitted = fit_calibration(x, label, np.arange(4000) // 20, ("similarity",), isotonic="on")
    probability = fitted.calibration.predict(np.array([[0.0], [1.0]]))
    assert 0.0 < probability[0] < 0.01
    assert 0.99 < probability[1] < 1.0


def test_top_model_kept_when_better():
    """Top rows whose label depends on the feature in reverse: only a model of their own fits them."""
    rng = np.random.default_rng(0)
    queries, per_query = 400, 10
    x = rng.uniform(-1, 1, queries * per_query)
    top = np.tile(np.arange(per_query) == 0, queries)
    slope = np.where(top, -6.0, 6.0)
    label = rng.uniform(size=x.size) < 1 / (1 + np.exp(-slope * x))
    query_ids = np.repeat(np.arange(queries), per_query)

    fitted = fit_calibration(x[:, None], label, query_ids, ("similarity",), isotonic="off", top=top)
    assert fitted.calibration.top is not None
    assert fitted.report["top_holdout_log_loss_own"] < fitted.report["top_holdout_log_loss_shared"]
    assert fitted.calibration.top.coef[0] < 0 < fitted.calibration.coef[0]
    probability = fitted.calibration.predict(np.array([[0.8], [0.8]]), top=np.array([True, False]))
    assert probability[0] < 0.2 < 0.8 < probability[1]

    alone = fit_calibration(x[:, None], label, query_ids, ("similarity",), isotonic="off", top=top, top_model="off")
    assert alone.calibration.top is None
    assert alone.report["top_model"] is False


def test_top_model_dropped_when_no_better():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 4000)
    label = rng.uniform(size=x.size) < 1 / (1 + np.exp(-5 * x))
    top = np.tile(np.arange(10) == 0, 400)
    fitted = fit_calibration(x[:, None], label, np.repeat(np.arange(400), 10), ("similarity",), isotonic="off",
                             top=top)
    assert fitted.calibration.top is None


def test_distractors_join_the_catalog_but_never_match():
    queries = clustered_split(3, classes=10)
    others = clustered_split(4, classes=10)
    distractors = EmbeddedSplit(others.embedding, others.uncertainty, others.labels + 100)
    metric = MetricSpec("sum", 4.0, 5.0)

    alone = calibration_candidates(queries, None, metric, rerank=False, candidates=20)
    crowded = calibration_candidates(queries, distractors, metric, rerank=False, candidates=20)

    nq = len(queries.labels)
    assert crowded.index.shape == (nq, 20)
    assert (crowded.index >= nq).any()  # distractors are among the candidates
    assert not crowded.relevant[crowded.index >= nq].any()
    np.testing.assert_array_equal(crowded.relevant_count, alone.relevant_count)
    with pytest.raises(ValueError, match="both queries and distractors"):
        calibration_candidates(queries, queries, metric, rerank=False, candidates=20)


def test_calibration_lists_are_class_balanced():
    queries = clustered_split(6, classes=10)
    others = clustered_split(7, classes=10)
    distractors = EmbeddedSplit(others.embedding, others.uncertainty, others.labels + 100)
    metric = MetricSpec("sum", 4.0, 5.0)
    all_labels = np.concatenate([queries.labels, distractors.labels])

    balanced = calibration_candidates(queries, distractors, metric, rerank=False, candidates=60)
    plain = calibration_candidates(queries, distractors, metric, rerank=False, candidates=60, protocol="leave-one-out")

    # 80 images in 20 classes of 4: balanced lists hold exactly 3 of every class, the query's included.
    assert balanced.index.shape == (40, 60)
    for row, query in zip(balanced.index, range(40)):
        assert query not in row
        np.testing.assert_array_equal(np.unique(all_labels[row], return_counts=True)[1], 3)
    # Leave-one-out lists hold whole classes, which a label count reads as "not the query's class".
    assert max(np.bincount(all_labels[row]).max() for row in plain.index) == 4
    assert (plain.index != np.arange(40)[:, None]).all()


def with_sources(split: EmbeddedSplit) -> EmbeddedSplit:
    """Return a `clustered_split` whose image i of every class comes from source "s{i}", as emoji vendors."""
    per_class = int(np.bincount(split.labels).max())
    sources = np.array([f"s{row % per_class}" for row in range(len(split.labels))])
    return EmbeddedSplit(split.embedding, split.uncertainty, split.labels, sources)


def test_cross_source_lists_leave_out_the_query_source():
    queries = with_sources(clustered_split(8, classes=10))
    others = with_sources(clustered_split(9, classes=10))
    distractors = EmbeddedSplit(others.embedding, others.uncertainty, others.labels + 100, others.sources)
    metric = MetricSpec("sum", 4.0, 5.0)
    all_sources = np.concatenate([queries.sources, distractors.sources])
    all_labels = np.concatenate([queries.labels, distractors.labels])

    lists = calibration_candidates(queries, distractors, metric, rerank=False, candidates=60, duplicates=0.3, seed=1)

    # 80 images of 4 sources: 60 of other sources, 3 of every class.
    assert lists.index.shape == (40, 60)
    found_itself = lists.index[:, 0] == np.arange(40)
    assert 0 < found_itself.sum() < 40
    for query in np.flatnonzero(~found_itself):
        row = lists.index[query]
        assert not (all_sources[row] == queries.sources[query]).any()
        np.testing.assert_array_equal(np.unique(all_labels[row], return_counts=True)[1], 3)
    # A query in the catalog keeps its own source, and another source leaves: still 3 images a class.
    for query in np.flatnonzero(found_itself):
        row = lists.index[query]
        assert (all_sources[row[1:]] == queries.sources[query]).any()
        assert len(np.unique(all_sources[row])) == 3
        np.testing.assert_array_equal(np.unique(all_labels[row], return_counts=True)[1], 3)


def test_cross_source_lists_reject_missing_sources():
    queries = with_sources(clustered_split(8, classes=10))
    unsourced = clustered_split(8, classes=10)
    metric = MetricSpec("sum", 4.0, 5.0)

    auto = calibration_candidates(unsourced, None, metric, rerank=False, candidates=20)
    assert auto.index.shape == (40, 20)  # "auto" falls back to the balanced lists
    with pytest.raises(ValueError, match="records no source; use the protocol 'balanced'"):
        calibration_candidates(unsourced, None, metric, rerank=False, candidates=8, protocol="cross-source")
    one_source = EmbeddedSplit(queries.embedding, queries.uncertainty, queries.labels, np.full(40, "google"))
    with pytest.raises(ValueError, match="records one"):
        calibration_candidates(one_source, None, metric, rerank=False, candidates=8, protocol="cross-source")
    distractors = EmbeddedSplit(unsourced.embedding, unsourced.uncertainty, unsourced.labels + 100)
    with pytest.raises(ValueError, match="both record image sources, or neither"):
        calibration_candidates(queries, distractors, metric, rerank=False, candidates=8)
    with pytest.raises(ValueError, match="protocol must be one of"):
        calibration_candidates(queries, None, metric, rerank=False, candidates=8, protocol="vendor")


def test_balanced_copies_keep_class_sizes_equal():
    queries = clustered_split(10, classes=10)
    metric = MetricSpec("sum", 4.0, 5.0)

    lists = calibration_candidates(queries, None, metric, rerank=False, candidates=30, duplicates=1.0,
                                   protocol="balanced")

    assert lists.index.shape == (40, 30)
    np.testing.assert_array_equal(lists.index[:, 0], np.arange(40))
    for row in lists.index:
        np.testing.assert_array_equal(np.unique(queries.labels[row], return_counts=True)[1], 3)
        assert len(set(row.tolist())) == 30


def test_duplicate_queries_find_themselves_first():
    queries = clustered_split(5, classes=10)
    metric = MetricSpec("sum", 4.0, 5.0)

    every = calibration_candidates(queries, None, metric, rerank=False, candidates=8, duplicates=1.0)
    none = calibration_candidates(queries, None, metric, rerank=False, candidates=8, duplicates=0.0)
    some = calibration_candidates(queries, None, metric, rerank=False, candidates=8, duplicates=0.3, seed=2)

    nq = len(queries.labels)
    np.testing.assert_array_equal(every.index[:, 0], np.arange(nq))
    np.testing.assert_allclose(every.similarity[:, 0], 1.0, atol=1e-5)
    assert every.relevant[:, 0].all()
    every_plain = calibration_candidates(queries, None, metric, rerank=False, candidates=8, duplicates=1.0,
                                         protocol="leave-one-out")
    complete = calibration_candidates(queries, None, metric, rerank=False, candidates=8, protocol="leave-one-out")
    np.testing.assert_array_equal(every_plain.index[:, 1:], complete.index[:, :-1])  # then the others, in order
    assert (none.index != np.arange(nq)[:, None]).all()
    found_self = some.index[:, 0] == np.arange(nq)
    assert 0 < found_self.sum() < nq
    with pytest.raises(ValueError, match="fraction"):
        calibration_candidates(queries, None, metric, rerank=False, candidates=8, duplicates=1.5)


def test_protocol_checked_against_data_set_kind():
    check_protocol_for_kind("cross-source", "emoji")
    check_protocol_for_kind("auto", "folder")
    check_protocol_for_kind("balanced", "folder")
    with pytest.raises(ValueError, match="kind 'folder' records no image sources"):
        check_protocol_for_kind("cross-source", "folder")
    with pytest.raises(ValueError, match="protocol must be one of"):
        check_protocol_for_kind("vendor", "emoji")


def test_distractors_are_whole_classes():
    from training.data import Sample
    from training.export import sample_classes

    samples = [Sample(path=f"{label}/{i}.png", label=label, class_name=str(label)) for label in range(50) for i in range(label % 4 + 1)]
    chosen = sample_classes(samples, 40, seed=3)
    counts = np.bincount([sample.label for sample in samples])
    chosen_counts = np.bincount([sample.label for sample in chosen], minlength=counts.size)
    assert 30 < len(chosen) <= 40
    assert all(chosen_counts[label] in (0, counts[label]) for label in range(counts.size))
    assert chosen == [sample for sample in samples if chosen_counts[sample.label]]  # original order
    assert sample_classes(samples, 0, seed=3) == []
    assert len(sample_classes(samples, 10_000, seed=3)) == len(samples)
