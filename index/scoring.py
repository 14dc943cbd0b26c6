"""Introspective distance, reranking and calibrated confidence, in NumPy.

The indexer, the server and the training-side calibration all use these
functions, so the scores a user sees are the scores the calibration was fitted on.

Notation (per query, k candidates):
    similarity  cosine similarity of the L2-normalised semantic embeddings, (k,)
    alpha       squared Euclidean semantic distance, 2 - 2 * similarity, (k,)
    beta        pair uncertainty, (k,)
    distance    introspective distance alpha * exp(-(beta + shift) / (scale * alpha)), (k,)

A larger beta shrinks the distance: the pair is allowed to look closer when the
model is unsure about one of the two images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

# alpha below this is treated as this, so identical images get distance ~0, not NaN.
ALPHA_EPS = 1e-6

# Features the calibration may use, computed by `confidence_features`.
CONFIDENCE_FEATURES = (
    "similarity",
    "distance",
    "query_uncertainty",
    "item_uncertainty",
    "top_margin",
    "label_margin",
    "label_support",
    "log_rank",
    "label_vote",
    "identity",
)

# `label_support` counts label agreement among this many nearest candidates.
LABEL_SUPPORT_NEIGHBOURS = 10

# Temperature of the `label_vote` weights exp((similarity - best) / T), in cosine units. Chosen on
# the emoji validation classes (rank-1 AUROC of the confidence, cross-source lists, 5 x 5-fold
# grouped by class, bench/confidence_designs.py): 0.835 at T = 0.005, 0.843 at 0.01, 0.847 at 0.02,
# 0.842 at 0.03, 0.837 at 0.05.
LABEL_VOTE_TEMPERATURE = 0.02

# `identity` is -log(1 - similarity) with the similarity capped here, so a copy of the query scores 9.2.
IDENTITY_MAX_SIMILARITY = 1.0 - 1e-4


@dataclass(frozen=True)
class MetricSpec:
    """Constants of the introspective distance; stored in `model.json` under `metric`."""

    beta_form: Literal["sum", "diff"]  # "sum": ||u1||^2 + ||u2||^2; "diff": ||u1 - u2||^2
    shift: float  # added to beta inside the exponent
    scale: float  # multiplies alpha inside the exponent


def uncertainty_scalar(uncertainty: np.ndarray) -> np.ndarray:
    """Reduce uncertainty embeddings (n, du) to one non-negative float each, ||u||^2, shape (n,)."""
    uncertainty = np.asarray(uncertainty, dtype=np.float32)
    return np.einsum("nd,nd->n", uncertainty, uncertainty)


def pair_beta(
    spec: MetricSpec,
    query_uncertainty: np.ndarray,
    item_uncertainty: np.ndarray,
) -> np.ndarray:
    """Pair uncertainty beta between one query and k catalog items.

    For `beta_form == "sum"`, both arguments are scalars ||u||^2: a float (or
    shape ()) for the query and shape (k,) for the items. For "diff" they are
    the uncertainty embeddings: (du,) and (k, du).

    Returns:
        float32 array of shape (k,).
    """
    if spec.beta_form == "sum":
        return (np.float32(query_uncertainty) + np.asarray(item_uncertainty, np.float32)).astype(
            np.float32
        )
    if spec.beta_form == "diff":
        query = np.asarray(query_uncertainty, np.float32).reshape(1, -1)
        items = np.asarray(item_uncertainty, np.float32)
        if items.ndim != 2 or items.shape[1] != query.shape[1]:
            raise ValueError(
                f"beta_form 'diff' needs uncertainty embeddings: query (du,), items (k, du); "
                f"got {query.shape[1:]} and {items.shape}"
            )
        diff = items - query
        return np.einsum("kd,kd->k", diff, diff).astype(np.float32)
    raise ValueError(f"unknown beta_form {spec.beta_form!r}; expected 'sum' or 'diff'")


def introspective_distance(
    similarity: np.ndarray, beta: np.ndarray, spec: MetricSpec
) -> np.ndarray:
    """Introspective distance from cosine similarities (k,) and pair uncertainties (k,).

    Returns:
        float32 array (k,), >= 0; 0 for identical embeddings, at most 4.
    """
    similarity = np.asarray(similarity, np.float64)
    alpha = np.maximum(2.0 - 2.0 * similarity, ALPHA_EPS)
    beta = np.asarray(beta, np.float64)
    return (alpha * np.exp(-(beta + spec.shift) / (spec.scale * alpha))).astype(np.float32)


def rerank_order(distance: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """Indices that sort candidates by introspective distance, ties broken by similarity.

    Returns:
        int64 array (k,), a permutation of range(k).
    """
    return np.lexsort((-np.asarray(similarity), np.asarray(distance)))


def confidence_features(
    similarity: np.ndarray,
    distance: np.ndarray,
    query_uncertainty: float,
    item_uncertainty: np.ndarray,
    names: tuple[str, ...] | list[str] = CONFIDENCE_FEATURES,
    labels: Sequence[object] | np.ndarray | None = None,
) -> np.ndarray:
    """Feature matrix (k, len(names)) for the confidence model.

    `item_uncertainty` is the scalar ||u||^2 of each candidate (k,). `labels`
    (k,) groups candidates that show the same thing: the item label, or the
    item id for an unlabelled item; None treats every candidate as its own group.

    - `top_margin`: similarity minus the best similarity among the other
      candidates, positive only for the clear winner.
    - `label_margin`: similarity minus the best similarity among candidates of
      another label. Catalogs often contain several images of one product, and
      a near-duplicate image of the same product is no evidence against a match.
    - `label_support`: fraction of the `LABEL_SUPPORT_NEIGHBOURS` most similar
      candidates that share the candidate's label.
    - `log_rank`: log(1 + rank by similarity), rank 0 for the most similar.
    - `label_vote`: share of the candidate's label in a soft vote of all
      candidates, each weighted by exp((similarity - best) / T) with T =
      `LABEL_VOTE_TEMPERATURE`: near 1 when the close candidates agree.
    - `identity`: -log(1 - similarity), about 2 for a typical match and 9.2
      for a copy of the query. It lets a linear model treat a copy apart from
      a close look-alike, where a wrong match often has the higher similarity.

    These compare each candidate with the others, so compute features over
    the full candidate list, before any filtering by confidence.
    """
    similarity = np.asarray(similarity, np.float64)
    k = similarity.shape[0]
    if labels is not None and len(labels) != k:
        raise ValueError(f"labels has {len(labels)} entries for {k} candidates")
    # Group codes cost a sort of the labels per query, so only label features compute them.
    if labels is None or not {"label_margin", "label_support", "label_vote"} & set(names):
        codes = np.arange(k)
    else:
        codes = _group_codes(labels)
    columns = []
    for name in names:
        if name == "similarity":
            columns.append(similarity)
        elif name == "distance":
            columns.append(np.asarray(distance, np.float64))
        elif name == "query_uncertainty":
            columns.append(np.full(k, float(query_uncertainty)))
        elif name == "item_uncertainty":
            columns.append(np.asarray(item_uncertainty, np.float64))
        elif name == "top_margin":
            columns.append(_top_margin(similarity))
        elif name == "label_margin":
            columns.append(_label_margin(similarity, codes))
        elif name == "label_support":
            columns.append(_label_support(similarity, codes))
        elif name == "label_vote":
            columns.append(_label_vote(similarity, codes))
        elif name == "identity":
            columns.append(-np.log1p(-np.minimum(similarity, IDENTITY_MAX_SIMILARITY)))
        elif name == "log_rank":
            rank = np.empty(k)
            rank[np.argsort(-similarity, kind="stable")] = np.arange(k)
            columns.append(np.log1p(rank))
        else:
            raise ValueError(
                f"unknown confidence feature {name!r}; known: {', '.join(CONFIDENCE_FEATURES)}"
            )
    if not columns:
        return np.zeros((k, 0))
    return np.stack(columns, axis=1)


def _label_margin(similarity: np.ndarray, codes: np.ndarray) -> np.ndarray:
    other = codes[:, None] != codes[None, :]
    best_other = np.where(other, similarity[None, :], -np.inf).max(axis=1)
    # With no candidate of another label, compare with the lowest possible cosine, -1.
    best_other = np.where(np.isfinite(best_other), best_other, -1.0)
    return similarity - best_other


def _group_codes(labels: Sequence[object] | np.ndarray) -> np.ndarray:
    """Integer codes (k,) in 0 .. groups - 1, equal where the labels are equal."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iub":
        return np.unique(labels, return_inverse=True)[1].reshape(-1)
    # A dict beats np.unique on a short list of strings: no array of str, no sort.
    first: dict = {}
    return np.array([first.setdefault(label, len(first)) for label in labels], dtype=np.int64)


def top_candidate_mask(similarity: np.ndarray) -> np.ndarray:
    """Bool mask of each query's most similar candidate (the first one on ties).

    `similarity` is (k,) for one query or (nq, k); the mask has its shape.
    """
    similarity = np.asarray(similarity)
    mask = np.zeros(similarity.shape, bool)
    if similarity.size:
        best = np.argmax(similarity, axis=-1)
        np.put_along_axis(mask, np.expand_dims(best, -1), True, axis=-1)
    return mask


def _label_vote(similarity: np.ndarray, codes: np.ndarray) -> np.ndarray:
    weight = np.exp((similarity - similarity.max()) / LABEL_VOTE_TEMPERATURE)
    per_label = np.bincount(codes, weights=weight)
    return per_label[codes] / weight.sum()


def _label_support(similarity: np.ndarray, codes: np.ndarray) -> np.ndarray:
    nearest = codes[np.argsort(-similarity, kind="stable")[:LABEL_SUPPORT_NEIGHBOURS]]
    return (codes[:, None] == nearest[None, :]).mean(axis=1)


def _top_margin(similarity: np.ndarray) -> np.ndarray:
    k = similarity.shape[0]
    if k == 1:
        return np.zeros(1)
    order = np.argsort(-similarity)
    best, second = similarity[order[0]], similarity[order[1]]
    # For each candidate, the best similarity among the others.
    best_other = np.where(np.arange(k) == order[0], second, best)
    return similarity - best_other


@dataclass(frozen=True)
class Calibration:
    """Logistic regression on standardised features, optionally followed by isotonic regression.

    Stored in `model.json` under `calibration`. `top`, when set, is a second
    model of the same features for each query's most similar candidate: the
    top result's features mean something else than a 30th candidate's (its
    margin over the others is a margin over the runner-up). Export keeps it
    when it lowers the held-out log loss of the top candidates.
    """

    features: tuple[str, ...]
    mean: np.ndarray  # (F,) feature means used for standardisation
    std: np.ndarray  # (F,) feature standard deviations, > 0
    coef: np.ndarray  # (F,) logistic weights
    intercept: float
    isotonic_x: np.ndarray | None = None  # increasing logistic outputs in [0, 1]
    isotonic_y: np.ndarray | None = None  # calibrated probabilities at isotonic_x
    top: "Calibration | None" = None  # model of each query's most similar candidate

    def predict(self, features: np.ndarray, top: np.ndarray | None = None) -> np.ndarray:
        """Compute the probability that each candidate shows the same thing as the query, (k,) in [0, 1].

        `top` is a bool mask (k,) of the rows that are their query's most
        similar candidate; the `top` model scores them when there is one.
        Without the mask every row uses the shared model.
        """
        features = np.asarray(features, np.float64)
        probability = self._predict_one(features)
        if self.top is not None and top is not None:
            top = np.asarray(top, bool)
            if top.shape != probability.shape:
                raise ValueError(f"top mask has shape {top.shape}, expected {probability.shape}")
            if top.any():
                probability[top] = self.top._predict_one(features[top])
        return probability

    def _predict_one(self, features: np.ndarray) -> np.ndarray:
        standardised = (features - self.mean) / self.std
        logits = standardised @ self.coef + self.intercept
        probability = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))
        if self.isotonic_x is not None and self.isotonic_y is not None:
            probability = np.interp(probability, self.isotonic_x, self.isotonic_y)
        return np.clip(probability, 0.0, 1.0).astype(np.float32)

    def to_json(self) -> dict:
        record = {
            "kind": "logistic" if self.isotonic_x is None else "logistic+isotonic",
            "features": list(self.features),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "coef": [float(v) for v in self.coef],
            "intercept": float(self.intercept),
        }
        if self.isotonic_x is not None and self.isotonic_y is not None:
            record["isotonic_x"] = [float(v) for v in self.isotonic_x]
            record["isotonic_y"] = [float(v) for v in self.isotonic_y]
        if self.top is not None:
            record["top"] = self.top.to_json()
        return record

    @classmethod
    def from_json(cls, record: dict) -> "Calibration":
        iso_x = record.get("isotonic_x")
        iso_y = record.get("isotonic_y")
        return cls(
            features=tuple(record["features"]),
            mean=np.asarray(record["mean"], np.float64),
            std=np.asarray(record["std"], np.float64),
            coef=np.asarray(record["coef"], np.float64),
            intercept=float(record["intercept"]),
            isotonic_x=None if iso_x is None else np.asarray(iso_x, np.float64),
            isotonic_y=None if iso_y is None else np.asarray(iso_y, np.float64),
            top=None if record.get("top") is None else cls.from_json(record["top"]),
        )
