"""Fit and measure the confidence model shipped in a bundle's `calibration` section.

The confidence of a search result is the probability that the returned item
shows the same thing as the query. `fit_calibration` fits it on candidate lists
of the validation classes, built exactly as the server builds them (see
`training.bundle_eval.score_candidates`). The model is a logistic regression
on standardised `index.scoring.confidence_features`. An isotonic regression
follows when it lowers the expected calibration error of held-out validation
queries. The result is an `index.scoring.Calibration`, so the server computes
confidence with the very numbers fitted here.

The ambiguity flag marks a query whose uncertainty scalar ||u||^2 lies above a
quantile of the validation queries' values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from index.scoring import CONFIDENCE_FEATURES, Calibration

logger = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width probability bins of the expected calibration error
MIN_STD = 1e-8  # a feature with a smaller standard deviation is constant; its std is stored as 1
# The isotonic step is kept only when it lowers the held-out ECE by more than this. Its flat blocks
# tie confidences that the logistic output ranked, so a gain within noise costs ranking for nothing.
ISOTONIC_MIN_GAIN = 0.005


def bin_index(probability: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each probability among `bins` equal-width bins of [0, 1].

    Bin b covers [b / bins, (b + 1) / bins); the last bin also takes 1.0.

    Returns:
        int64 array of the shape of `probability`, values in [0, bins).
    """
    probability = np.asarray(probability, np.float64)
    return np.clip(np.floor(probability * bins).astype(np.int64), 0, bins - 1)


def expected_calibration_error(
    probability: np.ndarray, label: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Expected calibration error with `bins` equal-width bins.

    ECE = sum over bins of (n_b / n) * |mean probability in b - fraction of positives in b|.

    Args:
        probability: predicted probabilities in [0, 1], any shape.
        label: 0/1 or bool outcomes of the same shape.

    Returns:
        ECE in [0, 1]; NaN for empty input.
    """
    probability = np.asarray(probability, np.float64).ravel()
    label = np.asarray(label, np.float64).ravel()
    if probability.shape != label.shape:
        raise ValueError(f"probability {probability.shape} and label {label.shape} differ in shape")
    if probability.size == 0:
        return float("nan")
    index = bin_index(probability, bins)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(
        np.bincount(index, weights=probability, minlength=bins)
        - np.bincount(index, weights=label, minlength=bins)
    )
    # Per bin |sum p - sum y| / n equals (n_b / n) * |mean p - mean y|.
    return float(gap[count > 0].sum() / probability.size)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin statistics of a reliability diagram; every array has shape (bins,)."""

    lower: np.ndarray  # bin lower edges
    upper: np.ndarray  # bin upper edges
    count: np.ndarray  # int64 number of predictions in the bin
    mean_probability: np.ndarray  # mean predicted probability; NaN for an empty bin
    positive_rate: np.ndarray  # observed fraction of positives; NaN for an empty bin


def reliability_curve(
    probability: np.ndarray, label: np.ndarray, bins: int = ECE_BINS
) -> ReliabilityCurve:
    """Reliability diagram data with the bins of `expected_calibration_error`."""
    probability = np.asarray(probability, np.float64).ravel()
    label = np.asarray(label, np.float64).ravel()
    index = bin_index(probability, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probability = np.bincount(index, weights=probability, minlength=bins) / count
        positive_rate = np.bincount(index, weights=label, minlength=bins) / count
    edges = np.linspace(0.0, 1.0, bins + 1)
    return ReliabilityCurve(
        lower=edges[:-1],
        upper=edges[1:],
        count=count.astype(np.int64),
        mean_probability=mean_probability,
        positive_rate=positive_rate,
    )


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the 0/1 `label`; NaN when one class is absent."""
    label = np.asarray(label).astype(bool).ravel()
    if label.all() or not label.any():
        return float("nan")
    return float(roc_auc_score(label, np.asarray(score, np.float64).ravel()))


def _check_training_data(features: np.ndarray, label: np.ndarray, names: tuple[str, ...]) -> None:
    if features.ndim != 2 or features.shape[1] != len(names):
        raise ValueError(
            f"features must have shape (n, {len(names)}) for features {list(names)}, got {features.shape}"
        )
    if label.shape != (features.shape[0],):
        raise ValueError(f"label must have shape ({features.shape[0]},), got {label.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values; check the embeddings")
    positives = int(label.sum())
    if positives == 0 or positives == label.size:
        raise ValueError(
            f"calibration needs both matching and non-matching candidates, got {positives} "
            f"matches among {label.size}; use a validation split with several images per class"
        )


def fit_logistic(
    features: np.ndarray,
    label: np.ndarray,
    names: tuple[str, ...] | list[str] = CONFIDENCE_FEATURES,
    *,
    regularization: float = 1.0,
) -> Calibration:
    """Fit a logistic regression on standardised features.

    Args:
        features: float (n, F), column j is feature `names[j]`.
        label: 0/1 or bool (n,), 1 when the candidate shows the same thing as the query.
        regularization: inverse L2 strength, scikit-learn's `C`.

    Returns:
        A Calibration without the isotonic step.
    """
    names = tuple(names)
    features = np.asarray(features, np.float64)
    label = np.asarray(label).astype(bool)
    _check_training_data(features, label, names)

    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std = np.where(std < MIN_STD, 1.0, std)
    model = LogisticRegression(C=regularization, max_iter=1000)
    model.fit((features - mean) / std, label)
    return Calibration(
        features=names,
        mean=mean,
        std=std,
        coef=model.coef_[0].astype(np.float64),
        intercept=float(model.intercept_[0]),
    )


def add_isotonic(calibration: Calibration, features: np.ndarray, label: np.ndarray) -> Calibration:
    """Return `calibration` followed by an isotonic regression fitted on its outputs.

    The isotonic step maps the logistic probability through an increasing
    piecewise-linear function, stored as breakpoints (`isotonic_x`, `isotonic_y`);
    outside the breakpoints the end values hold. Each block's rate is
    smoothed with one pseudo-observation at the overall positive rate,
    (positives + rate) / (count + 1), so no confidence is exactly 0 or 1 after a
    finite validation sample.
    """
    logistic_only = replace(calibration, isotonic_x=None, isotonic_y=None, top=None)
    probability = logistic_only.predict(features).astype(np.float64)
    isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    label = np.asarray(label, np.float64)
    isotonic.fit(probability, label)
    block_rate, block_index, block_count = np.unique(
        isotonic.predict(probability), return_inverse=True, return_counts=True
    )
    positives = np.bincount(block_index, weights=label, minlength=len(block_rate))
    smoothed = (positives + label.mean()) / (block_count + 1.0)
    # Smoothing can reorder two neighbouring small blocks: pool them again, weighted by size.
    smoothed = IsotonicRegression(increasing=True).fit_transform(
        np.arange(len(smoothed)), smoothed, sample_weight=block_count
    )
    nearest_block = np.abs(np.asarray(isotonic.y_thresholds_)[:, None] - block_rate[None, :]).argmin(axis=1)
    return replace(
        calibration,
        isotonic_x=np.asarray(isotonic.X_thresholds_, np.float64),
        isotonic_y=smoothed[nearest_block].astype(np.float64),
        top=None,
    )


@dataclass(frozen=True)
class CalibrationFit:
    """A fitted calibration and the held-out measurements that chose its kind."""

    calibration: Calibration
    report: dict = field(default_factory=dict)  # JSON-ready numbers, stored in model.json


def split_queries(query_ids: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """Bool mask (n,) of rows whose query falls in a seeded random held-out part.

    All candidates of a query land on the same side, so held-out numbers
    measure queries the fit has not seen.
    """
    query_ids = np.asarray(query_ids)
    unique = np.unique(query_ids)
    rng = np.random.default_rng(seed)
    held_count = int(round(len(unique) * holdout_fraction))
    held = rng.choice(unique, size=held_count, replace=False)
    return np.isin(query_ids, held)


def _log_loss(probability: np.ndarray, label: np.ndarray) -> float:
    probability = np.clip(np.asarray(probability, np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(label, np.log(probability), np.log(1 - probability))))


def _fit_kind(features: np.ndarray, label: np.ndarray, names: tuple[str, ...], use_isotonic: bool) -> Calibration:
    calibration = fit_logistic(features, label, names)
    return add_isotonic(calibration, features, label) if use_isotonic else calibration


def _choose_isotonic(
    features: np.ndarray, label: np.ndarray, fit: np.ndarray, held: np.ndarray, names: tuple[str, ...],
    isotonic: str, report: dict, prefix: str,
) -> bool:
    """Decide whether to keep the isotonic step: always ("on"), never ("off"), or ("auto") when it
    lowers the held-out ECE by more than ISOTONIC_MIN_GAIN."""
    if isotonic != "auto":
        return isotonic == "on"
    if not (label[fit].any() and not label[fit].all() and held.any()):
        logger.warning("held-out validation part has too few labels to compare; keeping the logistic fit only")
        return False
    logistic = fit_logistic(features[fit], label[fit], names)
    with_isotonic = add_isotonic(logistic, features[fit], label[fit])
    ece_logistic = expected_calibration_error(logistic.predict(features[held]), label[held])
    ece_isotonic = expected_calibration_error(with_isotonic.predict(features[held]), label[held])
    report[f"{prefix}holdout_ece_logistic"] = ece_logistic
    report[f"{prefix}holdout_ece_logistic_isotonic"] = ece_isotonic
    return ece_isotonic < ece_logistic - ISOTONIC_MIN_GAIN


def fit_calibration(
    features: np.ndarray,
    label: np.ndarray,
    query_ids: np.ndarray,
    names: tuple[str, ...] | list[str] = CONFIDENCE_FEATURES,
    *,
    holdout_fraction: float = 0.3,
    seed: int = 0,
    isotonic: str = "auto",
    top: np.ndarray | None = None,
    top_model: str = "auto",
) -> CalibrationFit:
    """Fit the confidence model on validation candidates.

    A seeded `holdout_fraction` of the queries is held out; the logistic
    regression, and an isotonic step on its outputs, are fitted on the rest.
    With `isotonic="auto"` the isotonic step is kept when it lowers the ECE of
    the held-out candidates. The chosen kind is then refitted on every query.

    With `top`, a bool mask of the rows that are their query's most similar
    candidate, a second model is fitted on those rows alone (`Calibration.top`).
    With `top_model="auto"` it is kept when its held-out log loss on the top
    rows is below the shared model's.

    Args:
        features: float (n, F) candidate features, one row per (query, candidate).
        label: 0/1 or bool (n,), 1 when the candidate has the query's class.
        query_ids: int (n,), the query each row belongs to.
        isotonic: "auto", "on" or "off".
        top: bool (n,), or None for one shared model.
        top_model: "auto", "on" or "off".

    Raises:
        ValueError: shapes disagree, a feature is not finite, there are fewer
            than 4 queries, or the labels are all equal.
    """
    for option, value in (("isotonic", isotonic), ("top_model", top_model)):
        if value not in ("auto", "on", "off"):
            raise ValueError(f"{option} must be 'auto', 'on' or 'off', got {value!r}")
    names = tuple(names)
    features = np.asarray(features, np.float64)
    label = np.asarray(label).astype(bool)
    query_ids = np.asarray(query_ids)
    _check_training_data(features, label, names)
    if query_ids.shape != label.shape:
        raise ValueError(f"query_ids must have shape {label.shape}, got {query_ids.shape}")
    if top is not None:
        top = np.asarray(top).astype(bool)
        if top.shape != label.shape:
            raise ValueError(f"top must have shape {label.shape}, got {top.shape}")
    query_count = len(np.unique(query_ids))
    if query_count < 4:
        raise ValueError(f"calibration needs at least 4 queries, got {query_count}")

    held = split_queries(query_ids, holdout_fraction, seed)
    fit = ~held
    report: dict = {
        "queries": query_count,
        "candidates": int(label.size),
        "positive_rate": float(label.mean()),
        "holdout_fraction": holdout_fraction,
        "holdout_queries": int(len(np.unique(query_ids[held]))),
    }
    use_isotonic = _choose_isotonic(features, label, fit, held, names, isotonic, report, "")
    calibration = _fit_kind(features, label, names, use_isotonic)
    report["kind"] = "logistic+isotonic" if use_isotonic else "logistic"

    if top is not None and top_model != "off":
        top_calibration = _fit_top(features, label, names, top, fit, held, isotonic, top_model, report)
        if top_calibration is not None:
            calibration = replace(calibration, top=top_calibration)
    report["top_model"] = calibration.top is not None
    report["fit_ece"] = expected_calibration_error(calibration.predict(features, top=top), label)
    logger.info(
        "fitted %s calibration%s on %d candidates of %d queries (positive rate %.3f)",
        report["kind"], " with a top-candidate model" if calibration.top is not None else "",
        label.size, query_count, report["positive_rate"],
    )
    return CalibrationFit(calibration=calibration, report=report)


def _fit_top(
    features: np.ndarray, label: np.ndarray, names: tuple[str, ...], top: np.ndarray, fit: np.ndarray,
    held: np.ndarray, isotonic: str, top_model: str, report: dict,
) -> Calibration | None:
    """Fit the top-candidate model on every top row; None when "auto" finds it no better than the shared one."""
    rows = top
    top_label = label[rows]
    if top_label.all() or not top_label.any():
        logger.warning("every top candidate is %s; no separate top model", "right" if top_label.all() else "wrong")
        return None
    top_fit, top_held = fit[rows], held[rows]
    top_features = features[rows]
    use_isotonic = _choose_isotonic(top_features, top_label, top_fit, top_held, names, isotonic, report, "top_")
    comparable = top_label[top_fit].any() and not top_label[top_fit].all() and top_held.any()
    if comparable:
        shared = _fit_kind(features[fit], label[fit], names, report["kind"] == "logistic+isotonic")
        own = _fit_kind(top_features[top_fit], top_label[top_fit], names, use_isotonic)
        held_features, held_label = top_features[top_held], top_label[top_held]
        shared_probability = shared.predict(held_features)
        own_probability = own.predict(held_features)
        report["top_holdout_log_loss_shared"] = _log_loss(shared_probability, held_label)
        report["top_holdout_log_loss_own"] = _log_loss(own_probability, held_label)
        report["top_holdout_auroc_shared"] = auroc(shared_probability, held_label)
        report["top_holdout_auroc_own"] = auroc(own_probability, held_label)
        if top_model == "auto" and report["top_holdout_log_loss_own"] >= report["top_holdout_log_loss_shared"]:
            return None
    elif top_model == "auto":
        logger.warning("held-out top candidates have too few labels to compare; no separate top model")
        return None
    report["top_kind"] = "logistic+isotonic" if use_isotonic else "logistic"
    return _fit_kind(top_features, top_label, names, use_isotonic)


def ambiguity_threshold(query_uncertainty: np.ndarray, quantile: float = 0.9) -> dict:
    """Threshold on the query uncertainty scalar ||u||^2 at a quantile of validation queries.

    Args:
        query_uncertainty: float (n,), ||u||^2 of each validation image.
        quantile: in (0, 1); about 1 - quantile of such queries get flagged.

    Returns:
        The `ambiguity` section of model.json: {"threshold", "quantile"}.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"ambiguity quantile must be in (0, 1), got {quantile}")
    values = np.asarray(query_uncertainty, np.float64).ravel()
    if values.size == 0:
        raise ValueError("ambiguity threshold needs at least one validation query")
    return {"threshold": float(max(np.quantile(values, quantile), 0.0)), "quantile": float(quantile)}
