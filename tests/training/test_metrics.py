"""Retrieval metrics against a naive full-matrix implementation on seeded data."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    class_balanced_neighbors,
    cross_source_neighbors,
    evaluate_embeddings,
    nearest_neighbors,
    nmi,
    retrieval_metrics,
    uncertainty_auroc,
)


def _clustered(seed: int, num_classes: int = 6, per_class: tuple[int, ...] = (1, 2, 3, 5), noise=0.9):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, 8))
    embeddings, labels = [], []
    for label in range(num_classes):
        count = per_class[label % len(per_class)]
        embeddings.append(centers[label] + noise * rng.normal(size=(count, 8)))
        labels += [label] * count
    embeddings = np.concatenate(embeddings)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings.astype(np.float32), np.array(labels)


def _naive_metrics(embeddings, labels, ks):
    similarity = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
    recall = {k: [] for k in ks}
    r_precision, average_precision = [], []
    for query in range(len(labels)):
        order = [j for j in np.argsort(-similarity[query], kind="stable") if j != query]
        relevant = [labels[j] == labels[query] for j in order]
        r = sum(labels == labels[query]) - 1
        if r == 0:
            continue
        for k in ks:
            recall[k].append(any(relevant[:k]))
        r_precision.append(sum(relevant[:r]) / r)
        precision_sum, hits = 0.0, 0
        for i in range(r):
            if relevant[i]:
                hits += 1
                precision_sum += hits / (i + 1)
        average_precision.append(precision_sum / r)
    expected = {f"recall_at_{k}": float(np.mean(recall[k])) for k in ks}
    expected["r_precision"] = float(np.mean(r_precision))
    expected["map_at_r"] = float(np.mean(average_precision))
    expected["num_queries"] = len(r_precision)
    return expected


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_retrieval_metrics_match_naive(seed, chunk_size):
    embeddings, labels = _clustered(seed)
    ks = (1, 2, 4, 8)
    metrics, first_hit, counted = retrieval_metrics(embeddings, labels, ks=ks, chunk_size=chunk_size)
    expected = _naive_metrics(embeddings, labels, ks)
    assert metrics["num_queries"] == expected["num_queries"]
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert counted.sum() == expected["num_queries"]
    assert first_hit[counted].mean() == pytest.approx(expected["recall_at_1"])


def test_retrieval_metrics_perfect_and_known_case():
    # Two tight classes: every metric is 1.
    embeddings = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.14, 0.99]], dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1])
    metrics, _, _ = retrieval_metrics(embeddings, labels, ks=(1, 2))
    assert metrics["recall_at_1"] == 1.0
    assert metrics["map_at_r"] == 1.0
    assert metrics["r_precision"] == 1.0

    # Class 0 has R = 2 per query. Ranked neighbours (hit = class 0):
    #   query 0: miss, hit, hit -> AP@R = (0 + 1/2) / 2 = 0.25, R-precision 1/2
    #   query 1: miss, hit, hit -> 0.25, 1/2
    #   query 3: hit, miss, hit -> (1 + 0) / 2 = 0.5, 1/2
    # Query 2 is the only image of class 1 and is left out.
    embeddings = np.array([[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 0])
    metrics, first_hit, counted = retrieval_metrics(embeddings, labels, ks=(1,))
    assert first_hit.tolist() == [False, False, False, True]
    assert counted.tolist() == [True, True, False, True]
    assert metrics["recall_at_1"] == pytest.approx(1 / 3)
    assert metrics["map_at_r"] == pytest.approx(1 / 3)
    assert metrics["r_precision"] == pytest.approx(0.5)


def test_nearest_neighbors_excludes_self():
    embeddings, _ = _clustered(0)
    similarities, indices = nearest_neighbors(embeddings, 4, chunk_size=5)
    assert (indices != np.arange(len(embeddings))[:, None]).all()
    assert (np.diff(similarities, axis=1) <= 1e-7).all()


def test_class_balanced_drops_one_per_class():
    # Classes of 1, 2, 3 and 5 images; with k = n - classes the list is all that is left.
    embeddings, labels = _clustered(2, num_classes=8)
    classes = np.unique(labels)
    counts = np.bincount(labels)
    n = len(labels)
    k = n - classes.size
    similarities, indices = class_balanced_neighbors(embeddings, labels, k, chunk_size=5)
    assert indices.shape == (n, k)
    for query in range(n):
        row = indices[query]
        assert query not in row
        assert len(set(row.tolist())) == k
        present = np.bincount(labels[row], minlength=classes.size)
        np.testing.assert_array_equal(present, counts - 1)  # the query's class loses the query, others any one
        exact = embeddings[row] @ embeddings[query]
        np.testing.assert_allclose(similarities[query], exact, atol=1e-5)
        assert (np.diff(similarities[query]) <= 1e-6).all()


def test_class_balanced_neighbors_are_seeded():
    embeddings, labels = _clustered(3, num_classes=8, per_class=(4,))
    first = class_balanced_neighbors(embeddings, labels, 10, seed=1)
    again = class_balanced_neighbors(embeddings, labels, 10, seed=1, chunk_size=7)
    other = class_balanced_neighbors(embeddings, labels, 10, seed=2)
    np.testing.assert_array_equal(first[1], again[1])
    assert (first[1] != other[1]).any()
    plain = nearest_neighbors(embeddings, 10)[1]
    assert (first[1] != plain).any()
    # With every class of 4 images, leave-one-out lists hold whole classes, and balanced ones never do.
    def largest_label_count(rows):
        return max(np.bincount(labels[row]).max() for row in rows)
    assert largest_label_count(plain) == 4
    assert largest_label_count(first[1]) == 3
    some, some_indices = class_balanced_neighbors(embeddings, labels, 10, seed=1, query_count=5)
    np.testing.assert_array_equal(some_indices, first[1][:5])


def test_class_balanced_neighbors_reject_bad_arguments():
    embeddings, labels = _clustered(0)
    with pytest.raises(ValueError, match="n - classes"):
        class_balanced_neighbors(embeddings, labels, len(labels) - 1)
    with pytest.raises(ValueError, match="differ in length"):
        class_balanced_neighbors(embeddings, labels[:-1], 3)
    with pytest.raises(ValueError, match="query_count"):
        class_balanced_neighbors(embeddings, labels, 3, query_count=len(labels) + 1)


def test_cross_source_neighbors_skip_the_query_source():
    embeddings, labels = _clustered(4, num_classes=8, per_class=(4,))
    sources = np.array(["google", "twitter", "openmoji", "fluent"] * 8)
    similarities, indices = cross_source_neighbors(embeddings, sources, 24, chunk_size=5)
    assert indices.shape == (32, 24)
    for query in range(32):
        row = indices[query]
        assert not (sources[row] == sources[query]).any()
        assert len(set(row.tolist())) == 24
        np.testing.assert_allclose(similarities[query], embeddings[row] @ embeddings[query], atol=1e-5)
        assert (np.diff(similarities[query]) <= 1e-6).all()
    some = cross_source_neighbors(embeddings, sources, 24, query_count=3)
    np.testing.assert_array_equal(some[1], indices[:3])
    with pytest.raises(ValueError, match="largest source"):
        cross_source_neighbors(embeddings, sources, 25)
    with pytest.raises(ValueError, match="differ in length"):
        cross_source_neighbors(embeddings, sources[:-1], 3)


def test_neighbour_lists_of_a_catalog_image():
    # With in_catalog the query stays in its class and source; the caller puts it first.
    embeddings, labels = _clustered(5, num_classes=8, per_class=(4,))
    sources = np.array(["google", "twitter", "openmoji", "fluent"] * 8)
    rows = np.array([0, 5, 31])
    _, crossed = cross_source_neighbors(embeddings, sources, 23, rows=rows, in_catalog=True, seed=3)
    _, balanced = class_balanced_neighbors(embeddings, labels, 23, rows=rows, in_catalog=True, seed=3)
    for query, cross_row, balanced_row in zip(rows, crossed, balanced):
        assert query not in cross_row
        assert query not in balanced_row
        present = set(sources[cross_row].tolist())
        assert sources[query] in present
        assert len(present) == 3  # one other source left out
        with_query = np.append(balanced_row, query)
        np.testing.assert_array_equal(np.bincount(labels[with_query], minlength=8), 3)
    with pytest.raises(ValueError, match="query_count or rows"):
        cross_source_neighbors(embeddings, sources, 3, rows=rows, query_count=2)
    with pytest.raises(ValueError, match="at least two sources"):
        cross_source_neighbors(embeddings, np.full(32, "google"), 3)


def test_catalog_image_lists_with_small_classes():
    # Classes of 1, 2, 3 and 5 images; rows in reverse order; chunks smaller than the rows.
    embeddings, labels = _clustered(6, num_classes=8)
    counts = np.bincount(labels)
    rows = np.arange(len(labels))[::-1]
    k = len(labels) - counts.size - 1
    lists = [class_balanced_neighbors(embeddings, labels, k, rows=rows, in_catalog=True, seed=4, chunk_size=size)[1]
             for size in (1, 3, 1024)]
    np.testing.assert_array_equal(lists[0], lists[1])
    np.testing.assert_array_equal(lists[0], lists[2])
    for query, row in zip(rows, lists[0]):
        assert query not in row
        present = np.bincount(labels[np.append(row, query)], minlength=counts.size)
        if counts[labels[query]] > 1:
            np.testing.assert_array_equal(present, counts - 1)
        else:  # a lone query loses nothing more, so one image more stays than k can hold
            assert present[labels[query]] == 1
            assert (present <= np.maximum(counts - 1, 1)).all()
    # With two sources a copy keeps only its own source, and other queries see only the other one.
    sources = np.array(["a", "b"] * (len(labels) // 2) + ["a"] * (len(labels) % 2))
    largest = int(np.unique(sources, return_counts=True)[1].max())
    _, copy_rows = cross_source_neighbors(embeddings, sources, len(labels) - largest - 1, rows=rows[:4], in_catalog=True)
    for query, row in zip(rows[:4], copy_rows):
        assert set(sources[row].tolist()) == {sources[query]}


def test_nearest_neighbors_rejects_large_k():
    embeddings, _ = _clustered(0)
    with pytest.raises(ValueError, match="k=100"):
        nearest_neighbors(embeddings, 100)


def test_lone_queries_are_excluded():
    embeddings = np.eye(3, dtype=np.float32)
    labels = np.array([0, 1, 2])
    metrics, _, counted = retrieval_metrics(embeddings, labels, ks=(1,))
    assert metrics["num_queries"] == 0
    assert not counted.any()
    assert np.isnan(metrics["map_at_r"])


def test_nmi_perfect_clusters():
    embeddings, labels = _clustered(0, num_classes=5, per_class=(4,), noise=0.01)
    assert nmi(embeddings, labels, seed=0) == pytest.approx(1.0)


def test_nmi_random_labels_low():
    embeddings, labels = _clustered(0, num_classes=5, per_class=(4,), noise=0.01)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert nmi(embeddings, shuffled, seed=0) < 0.7


def test_uncertainty_auroc():
    hits = np.array([True, True, False, False])
    assert uncertainty_auroc(np.array([0.1, 0.2, 0.8, 0.9]), hits) == 1.0
    assert uncertainty_auroc(np.array([0.9, 0.8, 0.2, 0.1]), hits) == 0.0
    assert np.isnan(uncertainty_auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_evaluate_embeddings_keys():
    embeddings, labels = _clustered(1)
    uncertainty = np.random.default_rng(0).random((len(labels), 3)).astype(np.float32)
    metrics = evaluate_embeddings(embeddings, labels, uncertainty, ks=(1, 2))
    for key in ("recall_at_1", "recall_at_2", "map_at_r", "r_precision", "nmi",
                "uncertainty_auroc", "uncertainty_mean", "uncertainty_std", "num_queries"):
        assert key in metrics, key


def test_matches_pytorch_metric_learning():
    calculator_module = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    embeddings, labels = _clustered(4, num_classes=9, per_class=(1, 2, 3, 5))  # with lone labels
    calculator = calculator_module.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count"
    )
    import torch

    expected = calculator.get_accuracy(
        torch.from_numpy(embeddings), torch.from_numpy(labels), ref_includes_query=True
    )
    metrics, _, _ = retrieval_metrics(embeddings, labels, ks=(1,))
    assert metrics["recall_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-6)
    assert metrics["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-6)
    assert metrics["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
