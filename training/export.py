"""Export a checkpoint to a model bundle: `model.onnx` plus `model.json`.

    idml-train export runs/emoji/best.pt --out bundles/emoji

The graph takes uint8 RGB pixels (batch, size, size, 3) and does the cast,
the NHWC -> NCHW permutation and the pixel normalisation itself, so a client
cannot normalise differently from training. Export then

1. checks the graph (`onnx.checker`) and compares onnxruntime with torch at
   batch sizes 1, 7 and 32;
2. embeds the validation classes through the exported graph with
   `index.preprocess`, the server's own path, and measures which pair
   uncertainty (`beta_form`) and whether reranking by the introspective
   distance to use (`training.bundle_eval`);
3. fits the confidence calibration and the ambiguity threshold on the
   validation classes (`training.calibrate`);
4. measures the test classes for the record (never for a choice);
5. writes `model.json` through `index.bundle.write_manifest`, validates the
   folder with `index.bundle.load_bundle` and renames it into place.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from index.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ONNX_NAME,
    BundleError,
    ModelBundle,
    load_bundle,
    model_id_of,
    write_manifest,
)
from index.preprocess import PreprocessSpec, preprocess_bytes
from index.scoring import MetricSpec, top_candidate_mask
from training.bundle_eval import (
    DEFAULT_CANDIDATES,
    DEFAULT_RETURNED,
    EmbeddedSplit,
    PROTOCOLS,
    calibration_candidates,
    calibration_metrics,
    check_protocol_for_kind,
    choose_scoring,
    embed_samples,
    flatten_for_fit,
    json_ready,
    load_bundle_splits,
    measure_scoring,
    onnx_encoder,
    resolve_protocol,
    retrieval_metrics,
    score_candidates,
    with_distractors,
)
from training.calibrate import CalibrationFit, ambiguity_threshold, fit_calibration
from training.metrics import evaluate_embeddings, nearest_neighbors

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("embedding", "uncertainty")
OPSET = 18
WEIGHTS_DTYPES = ("float32", "float16", "int8")
# Below this many validation queries, export and calibrate warn that the confidence is a rough fit
# (an estimate: 15 ECE bins and a held-out 30% leave few queries per bin).
MIN_RELIABLE_CALIBRATION_QUERIES = 200
# Largest |onnxruntime - torch| accepted for a float32 graph, on either output.
FLOAT32_TOLERANCE = 1e-4
# Smallest mean cosine similarity between a float16 or int8 graph's embeddings and torch's,
# on real images. The int8 floor is an estimate: EfficientNet-Lite0 with static per-channel
# quantisation measured 0.986 (mean) and 0.947 (min) on 64 emoji validation images.
REDUCED_PRECISION_MIN_COSINE = {"float16": 0.999, "int8": 0.97}
INT8_CALIBRATION_IMAGES = 128  # training images that set the int8 activation ranges
PARITY_BATCH_SIZES = (1, 7, 32)
# float32 initializers with fewer elements stay float32 in a float16 graph (biases, norms).
FLOAT16_MIN_ELEMENTS = 1024
# Loggers of the exporter that report every graph rewrite at INFO, and the missing
# torchvision operators (which this model does not use) at WARNING.
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx._internal.exporter._registration")
DEFAULT_VAL_FRACTION = 0.2  # training.data.load_dataset's default
DEFAULT_SPLIT_SEED = 0


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with the torch model."""


class PixelGraph(nn.Module):
    """The exported computation: uint8 (n, size, size, 3) RGB -> (embedding, uncertainty).

    Casts to float, permutes NHWC to NCHW, normalises with the model's
    `input_mean` / `input_std` (0..255 scale) and runs the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = image.permute(0, 3, 1, 2)
        return self.model(self.model.normalize(pixels))


def export_graph(model: nn.Module, path: str | Path, *, size: int) -> None:
    """Write the float32 ONNX graph of `model` for `size` x `size` inputs to `path`.

    Uses the torch.export-based exporter (`dynamo=True`, needs onnxscript):
    on this model it folds the backbone's static "SAME" padding into constant
    pads, where the TorchScript exporter computes them at run time from the
    input shape. The batch dimension is dynamic; weights are stored inside the file.

    Raises:
        ExportError: `onnx.checker` rejects the graph.
    """
    model = model.eval()
    graph = PixelGraph(model).eval()
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"image": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    check_onnx(path)


def check_onnx(path: str | Path) -> onnx.ModelProto:
    """Run `onnx.checker.check_model` with shape inference; raise ExportError naming the file."""
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"{path}: the ONNX checker rejected the graph: {error}") from None
    return proto


def torch_outputs(model: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run `PixelGraph(model)` in torch on uint8 images (n, size, size, 3)."""
    graph = PixelGraph(model).eval()
    with torch.no_grad():
        embedding, uncertainty = graph(torch.from_numpy(np.ascontiguousarray(images)))
    return embedding.numpy(), uncertainty.numpy()


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    *,
    size: int,
    weights_dtype: str = "float32",
    images: np.ndarray | None = None,
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> dict:
    """Compare onnxruntime with torch at several batch sizes.

    A float32 graph must agree within FLOAT32_TOLERANCE (max abs difference on
    both outputs). A float16 or int8 graph must keep the mean cosine
    similarity of its embeddings with torch's at least
    REDUCED_PRECISION_MIN_COSINE; pass real `images` for that check, because
    activation ranges of random pixels differ from those of photos.

    Args:
        images: uint8 (n, size, size, 3) to draw the batches from (repeated
            when n is smaller than a batch); None draws random pixels.

    Returns:
        {"batch_sizes", "images", "max_abs_embedding", "max_abs_uncertainty",
        "min_cosine", "mean_cosine"}.

    Raises:
        ExportError: a difference beyond the tolerance.
    """
    encode = onnx_encoder(onnx_path)
    rng = np.random.default_rng(seed)
    report = {
        "batch_sizes": list(batch_sizes),
        "images": "random pixels" if images is None else f"{len(images)} real images",
        "max_abs_embedding": 0.0,
        "max_abs_uncertainty": 0.0,
        "min_cosine": 1.0,
    }
    cosines = []
    for batch_size in batch_sizes:
        if images is None:
            batch = rng.integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8)
        else:
            batch = images[np.arange(batch_size) % len(images)]
        expected_embedding, expected_uncertainty = torch_outputs(model, batch)
        embedding, uncertainty = encode(batch)
        if embedding.shape != expected_embedding.shape or uncertainty.shape != expected_uncertainty.shape:
            raise ExportError(
                f"batch {batch_size}: onnxruntime returned shapes {embedding.shape}, {uncertainty.shape}; "
                f"torch returned {expected_embedding.shape}, {expected_uncertainty.shape}"
            )
        embedding_error = float(np.abs(embedding - expected_embedding).max())
        uncertainty_error = float(np.abs(uncertainty - expected_uncertainty).max())
        cosine = np.sum(embedding * expected_embedding, axis=1)
        cosines.append(cosine)
        report["max_abs_embedding"] = max(report["max_abs_embedding"], embedding_error)
        report["max_abs_uncertainty"] = max(report["max_abs_uncertainty"], uncertainty_error)
        report["min_cosine"] = min(report["min_cosine"], float(cosine.min()))
        if weights_dtype == "float32" and max(embedding_error, uncertainty_error) > FLOAT32_TOLERANCE:
            raise ExportError(
                f"batch {batch_size}: onnxruntime differs from torch by {embedding_error:.3g} (embedding) "
                f"and {uncertainty_error:.3g} (uncertainty), above the tolerance {FLOAT32_TOLERANCE}"
            )
    report["mean_cosine"] = float(np.concatenate(cosines).mean())
    if weights_dtype != "float32" and report["mean_cosine"] < REDUCED_PRECISION_MIN_COSINE[weights_dtype]:
        raise ExportError(
            f"the {weights_dtype} graph's embeddings have mean cosine similarity {report['mean_cosine']:.4f} "
            f"with torch's over batches {list(batch_sizes)}, below {REDUCED_PRECISION_MIN_COSINE[weights_dtype]}; "
            "export float32 or float16 weights instead"
        )
    return report


def convert_weights_float16(source: str | Path, target: str | Path) -> None:
    """Store the large float32 weights of a graph as float16, computing in float32.

    Each float32 initializer with at least FLOAT16_MIN_ELEMENTS elements is
    replaced by a float16 copy and a Cast back to float32, so the file shrinks
    by about half. The input stays uint8 and the outputs float32. Every
    operator runs in float32, because onnxruntime folds the casts when it
    loads the graph. The accuracy cost is the rounding of the weights to float16.
    """
    proto = onnx.load(str(source))
    graph = proto.graph
    casts = []
    kept = []
    for initializer in graph.initializer:
        values = numpy_helper.to_array(initializer)
        if initializer.data_type != TensorProto.FLOAT or values.size < FLOAT16_MIN_ELEMENTS:
            kept.append(initializer)
            continue
        half_name = f"{initializer.name}__float16"
        kept.append(numpy_helper.from_array(values.astype(np.float16), half_name))
        casts.append(helper.make_node("Cast", [half_name], [initializer.name], to=TensorProto.FLOAT,
                                      name=f"{initializer.name}__to_float32"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(proto, str(target))
    check_onnx(target)


def convert_weights_int8(source: str | Path, target: str | Path, calibration_images: np.ndarray) -> None:
    """Quantise a graph to int8 with onnxruntime static quantisation.

    Weights become int8 per output channel; activations become uint8 with
    ranges (min and max) measured on `calibration_images`, in the QDQ format.
    Input and outputs keep their types (uint8 in, float32 out). Dynamic
    quantisation, which needs no images, lowered the mean cosine similarity
    with float32 to 0.77 on EfficientNet-Lite0 (emoji validation images), so
    it is not used.

    Args:
        calibration_images: uint8 (n, size, size, 3) from the training classes.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {INPUT_NAME: calibration_images[start : start + 16]}
                for start in range(0, len(calibration_images), 16)
            )

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(source),
        str(target),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    check_onnx(target)


def write_graph(
    model: nn.Module,
    folder: Path,
    *,
    size: int,
    weights_dtype: str,
    calibration_images: np.ndarray | None = None,
    parity_images: np.ndarray | None = None,
) -> tuple[Path, dict]:
    """Export, convert to `weights_dtype` and check the graph; returns its path and the parity report.

    Args:
        calibration_images: uint8 (n, size, size, 3) from the training
            classes; required for int8.
        parity_images: uint8 real images for the parity check of a float16 or
            int8 graph; float32 graphs are checked on random pixels.
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    if weights_dtype == "int8" and calibration_images is None:
        raise ValueError("int8 weights need calibration images from the training classes")
    final = folder / ONNX_NAME
    started = time.perf_counter()
    if weights_dtype == "float32":
        export_graph(model, final, size=size)
    else:
        float32_path = folder / "model.float32.onnx"
        export_graph(model, float32_path, size=size)
        if weights_dtype == "float16":
            convert_weights_float16(float32_path, final)
        else:
            convert_weights_int8(float32_path, final, calibration_images)
        float32_path.unlink()
    logger.info("exported %s graph (%s weights) in %.1f s", final, weights_dtype, time.perf_counter() - started)
    report = check_parity(
        model, final, size=size, weights_dtype=weights_dtype,
        images=None if weights_dtype == "float32" else parity_images,
    )
    logger.info(
        "onnxruntime vs torch on %s: max abs difference %.2g (embedding), %.2g (uncertainty), "
        "cosine min %.6f mean %.6f",
        report["images"], report["max_abs_embedding"], report["max_abs_uncertainty"],
        report["min_cosine"], report["mean_cosine"],
    )
    return final, report


def sample_images(samples: list, spec: PreprocessSpec, count: int, seed: int) -> np.ndarray:
    """Preprocess a seeded random subset of `count` samples: uint8 (m, size, size, 3), m <= count."""
    chosen = sample_split(samples, count, seed)
    return np.stack([preprocess_bytes(Path(sample.path).read_bytes(), spec) for sample in chosen])


@dataclass(frozen=True)
class ExportOptions:
    """Choices of `build_bundle`; the CLI flags of `idml-train export`."""

    weights_dtype: str = "float32"  # "float32", "float16" or "int8"
    beta_form: str = "auto"  # "auto" (chosen on validation), "sum" or "diff"
    rerank: str = "auto"  # "auto" (chosen on validation), "on" or "off"
    candidates: int = DEFAULT_CANDIDATES  # candidates per validation query, as the server fetches
    returned: int = DEFAULT_RETURNED  # results per query for calibration measurements
    isotonic: str = "auto"  # "auto", "on" or "off": isotonic step after the logistic calibration
    top_model: str = "auto"  # "auto", "on" or "off": separate confidence model of each query's top candidate
    # Training images (whole classes, at most this many) added to the validation catalog as distractors
    # when the confidence is fitted: the validation classes alone make a catalog emptier than a real one.
    calibration_distractors: int = 4000
    # Fraction of validation queries that also find themselves, as a query whose image is in the
    # catalog does. Without any, the confidence of an exact copy is extrapolated (it was 0.04).
    calibration_duplicates: float = 0.05
    # Catalog each validation query searches when the confidence is fitted and measured:
    # `training.bundle_eval.PROTOCOLS`; "auto" is cross-source where the data set records sources.
    calibration_protocol: str = "auto"
    ambiguity_quantile: float = 0.9  # validation quantile of ||u||^2 above which a query is ambiguous
    evaluate_test: bool = True  # also measure the test classes, for the record
    seed: int = 0  # seed of the held-out validation queries of calibration
    batch_size: int = 64  # images per onnxruntime run while embedding splits


def sample_split(samples: list, count: int, seed: int) -> list:
    """Draw a seeded random subset of at most `count` samples, kept in their original order."""
    if count <= 0 or not samples:
        return []
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(count, len(samples)), replace=False)
    return [samples[i] for i in sorted(chosen)]


def fit_confidence(
    val: EmbeddedSplit, distractors: EmbeddedSplit | None, metric: MetricSpec, rerank: bool, options: ExportOptions
) -> CalibrationFit:
    """Fit the bundle's confidence on validation queries against validation images plus distractors."""
    lists = calibration_candidates(
        val, distractors, metric, rerank=rerank, candidates=options.candidates,
        duplicates=options.calibration_duplicates, seed=options.seed, protocol=options.calibration_protocol,
    )
    queries = len(val.labels)
    if queries < MIN_RELIABLE_CALIBRATION_QUERIES:
        logger.warning(
            "the confidence is fitted on only %d validation queries (%d classes); expect its probabilities "
            "to be rough below %d queries: give the data set more classes or a larger validation fraction",
            queries, len(np.unique(val.labels)), MIN_RELIABLE_CALIBRATION_QUERIES,
        )
    features, labels, query_ids = flatten_for_fit(lists)
    fitted = fit_calibration(
        features, labels, query_ids, lists.feature_names, seed=options.seed, isotonic=options.isotonic,
        top=top_candidate_mask(lists.similarity).reshape(-1), top_model=options.top_model,
    )
    fitted.report["distractors"] = 0 if distractors is None else int(len(distractors.labels))
    fitted.report["duplicate_fraction"] = options.calibration_duplicates
    fitted.report["protocol"] = resolve_protocol(options.calibration_protocol, with_distractors(val, distractors))
    fitted.report["rank1_accuracy"] = float(lists.relevant[:, 0].mean())
    return fitted


def sample_classes(samples: list, count: int, seed: int) -> list:
    """Draw whole classes, in seeded random order, while their images fit in `count`; keep the original order.

    Distractors keep all the images of their classes: a class cut short would be a label with fewer
    images than the query's, a count that the label features could learn to reject.
    """
    if count <= 0 or not samples:
        return []
    by_class: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(position)
    chosen: list[int] = []
    for label in np.random.default_rng(seed).permutation(sorted(by_class)):
        if len(chosen) + len(by_class[int(label)]) <= count:
            chosen.extend(by_class[int(label)])
    return [samples[i] for i in sorted(chosen)]


def embed_distractors(splits: Any, spec: PreprocessSpec, encoder: Any, options: ExportOptions) -> EmbeddedSplit | None:
    chosen = sample_classes(list(splits.train), options.calibration_distractors, options.seed)
    if not chosen:
        return None
    started = time.perf_counter()
    distractors = embed_samples(chosen, spec, encoder, batch_size=options.batch_size, kind=splits.kind)
    logger.info("embedded %d training images as calibration distractors in %.1f s", len(chosen),
                time.perf_counter() - started)
    return distractors


def dataset_record(splits: Any, *, val_fraction: float, split_seed: int) -> dict:
    """Build the `dataset` section of model.json: name, root, split rule and counts."""
    return {
        "name": splits.kind,
        "root": str(splits.root),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "classes": {
            "train": splits.num_train_classes,
            "val": splits.num_val_classes,
            "test": splits.num_test_classes,
        },
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
    }


def evaluate_split(
    split: EmbeddedSplit, metric: MetricSpec, rerank: bool, calibration: Any, options: ExportOptions
) -> dict:
    """Retrieval and calibration of one embedded split under the bundle's metric settings.

    Retrieval is measured with plain leave-one-out lists, the confidence on
    the lists it was fitted on (`calibration_candidates`, no duplicates).
    """
    k = min(options.candidates, split.embedding.shape[0] - 1)
    similarity, index = nearest_neighbors(split.embedding, k)
    lists = score_candidates(split, index, similarity, metric, rerank=rerank)
    record = {"candidates": k, "served": retrieval_metrics(lists)}
    protocol = resolve_protocol(options.calibration_protocol, split)
    confidence_lists = calibration_candidates(
        split, None, metric, rerank=rerank, candidates=options.candidates, seed=options.seed,
        feature_names=calibration.features, protocol=protocol,
    )
    record["calibration"] = calibration_metrics(confidence_lists, calibration, returned=options.returned)
    record["calibration"]["protocol"] = protocol
    record["semantic"] = evaluate_embeddings(split.embedding, split.labels, split.uncertainty, compute_nmi=False)
    return record


def build_bundle(
    model: nn.Module,
    config: dict,
    splits: Any,
    out: str | Path,
    *,
    options: ExportOptions = ExportOptions(),
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    checkpoint_info: dict | None = None,
) -> ModelBundle:
    """Export `model` and write a complete, validated bundle folder at `out`.

    Args:
        model: an `IDMLModel` in eval mode.
        config: the resolved training config (`TrainConfig.to_dict()`); its
            `data` section gives the input size and resize, its `loss`
            section the metric constants.
        splits: `training.data.DatasetSplits`; `val` fits the choices and the
            calibration, `test` is only measured.
        out: bundle folder. An existing bundle there is replaced; any other
            existing path is an error.

    Raises:
        ExportError: the graph fails its checks.
        ValueError: the validation split is too small or `out` is not a bundle folder.
    """
    out = Path(out)
    if out.exists() and not (out.is_dir() and ((out / MANIFEST_NAME).exists() or not any(out.iterdir()))):
        raise ValueError(f"{out} exists and is not a model bundle folder; choose another --out")
    if len({sample.label for sample in splits.val}) < 2:
        raise ValueError(
            f"the validation split has {len(splits.val)} images in fewer than 2 classes; "
            "calibration needs several validation classes (raise the validation fraction)"
        )
    check_protocol_for_kind(options.calibration_protocol, splits.kind)
    data = config["data"]
    loss = config["loss"]
    size = int(data["image_size"])
    resize = int(data["resize"]) if data.get("resize") is not None else round(size * 8 / 7)
    spec = PreprocessSpec(size=size, resize=resize)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        calibration_images = parity_images = None
        if options.weights_dtype != "float32":
            parity_images = sample_images(splits.val, spec, max(PARITY_BATCH_SIZES), options.seed)
        if options.weights_dtype == "int8":
            calibration_images = sample_images(splits.train, spec, INT8_CALIBRATION_IMAGES, options.seed)
        onnx_path, parity = write_graph(
            model, staging, size=size, weights_dtype=options.weights_dtype,
            calibration_images=calibration_images, parity_images=parity_images,
        )
        encoder = onnx_encoder(onnx_path)

        started = time.perf_counter()
        val = embed_samples(splits.val, spec, encoder, batch_size=options.batch_size, kind=splits.kind)
        logger.info("embedded %d validation images in %.1f s", len(splits.val), time.perf_counter() - started)
        rows = measure_scoring(
            val,
            shift=float(loss["metric_shift"]),
            scale=float(loss["metric_scale"]),
            candidates=options.candidates,
            returned=options.returned,
            seed=options.seed,
            protocol=options.calibration_protocol,
        )
        choice = choose_scoring(rows, beta_form=options.beta_form, rerank=options.rerank)
        metric = MetricSpec(
            beta_form=choice.beta_form, shift=float(loss["metric_shift"]), scale=float(loss["metric_scale"])
        )

        distractors = embed_distractors(splits, spec, encoder, options)
        fitted = fit_confidence(val, distractors, metric, choice.rerank, options)
        ambiguity = ambiguity_threshold(val.uncertainty_scalar, options.ambiguity_quantile)

        evaluation: dict[str, Any] = {
            "scoring_questions": choice.measurements,
            "calibration_fit": fitted.report,
            "val": evaluate_split(val, metric, choice.rerank, fitted.calibration, options),
            "export_check": parity,
        }
        if options.evaluate_test and splits.test:
            started = time.perf_counter()
            test = embed_samples(splits.test, spec, encoder, batch_size=options.batch_size, kind=splits.kind)
            logger.info("embedded %d test images in %.1f s", len(splits.test), time.perf_counter() - started)
            evaluation["test"] = evaluate_split(test, metric, choice.rerank, fitted.calibration, options)
        if checkpoint_info:
            evaluation["checkpoint"] = checkpoint_info

        outputs = {
            "embedding_dim": int(model.embedding_dim),
            "uncertainty_dim": int(model.uncertainty_dim),
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_id": model_id_of(onnx_path),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "backbone": str(model.backbone_name),
            "input": {"name": INPUT_NAME, "size": size, "resize": resize},
            "outputs": outputs,
            "metric": {
                "beta_form": metric.beta_form,
                "shift": metric.shift,
                "scale": metric.scale,
                "rerank": choice.rerank,
            },
            "calibration": fitted.calibration.to_json(),
            "ambiguity": ambiguity,
            "training": json_ready(config),
            "dataset": dataset_record(splits, val_fraction=val_fraction, split_seed=split_seed),
            "evaluation": json_ready(evaluation),
            "weights_dtype": options.weights_dtype,
        }
        write_manifest(staging, manifest)
        load_bundle(staging)  # the same checks the server runs
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bundle = load_bundle(out)
    logger.info(
        "wrote bundle %s (model_id %s, beta_form %s, rerank %s)", out, bundle.model_id, metric.beta_form, choice.rerank
    )
    return bundle


def _replace_folder(staging: Path, out: Path) -> None:
    """Move the finished `staging` folder to `out`, replacing an older bundle there.

    Each step is a rename on one file system, so `out` is never a half-written
    bundle: it is the old bundle, briefly absent, or the new one.
    """
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rmdir(retired)
    os.replace(out, retired)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    val_fraction: float | None = None,
    split_seed: int | None = None,
    options: ExportOptions = ExportOptions(),
) -> ModelBundle:
    """Load a checkpoint, read its data set and write a bundle (see `build_bundle`).

    The data set kind comes from the checkpoint's config; its root from
    `data_root` or else the config. The validation split must be the one the
    training run used: `val_fraction` and `split_seed` default to the config's
    `data.val_fraction` / `data.split_seed` when present, else to
    `training.data.load_dataset`'s defaults.
    """
    from training.checkpoint import load_checkpoint, load_model_from_checkpoint
    from training.data import load_dataset

    model, config = load_model_from_checkpoint(checkpoint)
    record = load_checkpoint(checkpoint)
    data = config["data"]
    root = Path(data_root) if data_root is not None else Path(data["root"])
    if val_fraction is None:
        val_fraction = float(data.get("val_fraction", DEFAULT_VAL_FRACTION))
    if split_seed is None:
        split_seed = int(data.get("split_seed", DEFAULT_SPLIT_SEED))
    splits = load_dataset(data["dataset"], root, val_fraction=val_fraction, seed=split_seed)
    checkpoint_info = {
        "path": str(checkpoint),
        "epoch": record.get("epoch"),
        "step": record.get("step"),
        "metrics": record.get("metrics") or {},
        "best": record.get("best") or {},
    }
    return build_bundle(
        model,
        config,
        splits,
        out,
        options=options,
        val_fraction=val_fraction,
        split_seed=split_seed,
        checkpoint_info=checkpoint_info,
    )


def recalibrate_bundle(
    bundle_path: str | Path,
    *,
    data_root: str | Path | None = None,
    dataset_kind: str | None = None,
    options: ExportOptions = ExportOptions(),
) -> ModelBundle:
    """Refit the confidence of an existing bundle in place; the graph and the model id stay.

    Embeds the validation split recorded in the bundle (and training images as
    distractors) with the bundle's own graph, fits `calibration` as export
    does, and rewrites `model.json` with it and with fresh `evaluation.val`,
    `evaluation.scoring_questions`, `evaluation.calibration_fit` and
    `evaluation.test` (removed when `options.evaluate_test` is false). The metric, scoring choices and ambiguity
    threshold are kept. `dataset_kind` with `data_root` fits on another data
    set (your own labelled catalog images) with the bundle's split rule. The
    fit report records that data set, and `dataset` keeps describing the
    training data.
    """
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    dataset = dict(manifest.dataset)
    if dataset_kind is not None:
        if data_root is None:
            raise ValueError("a data set kind needs its folder: give data_root (--data-root) too")
        dataset.update(name=dataset_kind, root=str(data_root))
    splits = load_bundle_splits(dataset, data_root)
    check_protocol_for_kind(options.calibration_protocol, splits.kind)
    spec = bundle.preprocess
    encoder = onnx_encoder(bundle.onnx_path)
    metric = bundle.metric
    rerank = manifest.metric.rerank
    val = embed_samples(splits.val, spec, encoder, batch_size=options.batch_size, kind=splits.kind)
    distractors = embed_distractors(splits, spec, encoder, options)
    fitted = fit_confidence(val, distractors, metric, rerank, options)
    fitted.report["dataset"] = {"name": dataset["name"], "root": str(splits.root)}
    # The measurements behind beta_form and rerank are refreshed; the bundle keeps its choices.
    choice = choose_scoring(measure_scoring(
        val, shift=metric.shift, scale=metric.scale, candidates=options.candidates, returned=options.returned,
        seed=options.seed, protocol=options.calibration_protocol,
    ))
    if (choice.beta_form, choice.rerank) != (metric.beta_form, rerank):
        logger.warning(
            "validation now prefers beta_form %s, rerank %s; the bundle keeps beta_form %s, rerank %s "
            "(export again to change them)", choice.beta_form, choice.rerank, metric.beta_form, rerank,
        )

    record = manifest.model_dump(mode="json", exclude_none=True)
    record["calibration"] = fitted.calibration.to_json()
    evaluation = dict(record.get("evaluation") or {})
    evaluation["scoring_questions"] = choice.measurements
    evaluation["calibration_fit"] = fitted.report
    evaluation["val"] = evaluate_split(val, metric, rerank, fitted.calibration, options)
    if options.evaluate_test and splits.test:
        test = embed_samples(splits.test, spec, encoder, batch_size=options.batch_size, kind=splits.kind)
        evaluation["test"] = evaluate_split(test, metric, rerank, fitted.calibration, options)
    else:  # the old figures describe the old calibration
        evaluation.pop("test", None)
    record["evaluation"] = json_ready(evaluation)
    write_manifest(bundle.path, record)
    refreshed = load_bundle(bundle.path)
    logger.info("recalibrated bundle %s (model_id %s): %s calibration%s", refreshed.path, refreshed.model_id,
                refreshed.manifest.calibration.kind, " with a top-candidate model" if fitted.calibration.top else "")
    return refreshed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idml-train export",
        description="Export a checkpoint to a model bundle folder (model.onnx + model.json).",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint file written by idml-train, e.g. runs/emoji/best.pt")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write; an older bundle there is replaced")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data set folder (default: data.root of the checkpoint's config)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help=f"fraction of training classes held out for validation, as in training "
                             f"(default: the config's, else {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--split-seed", type=int, default=None,
                        help=f"seed of the validation class draw, as in training (default: the config's, else {DEFAULT_SPLIT_SEED})")
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float32",
                        help="storage of the weights: float32, float16 (half the file, float32 compute) "
                             "or int8 (static quantisation, activation ranges from training images)")
    parser.add_argument("--beta-form", choices=("auto", "sum", "diff"), default="auto",
                        help="pair uncertainty of the metric; auto chooses on the validation classes")
    parser.add_argument("--rerank", choices=("auto", "on", "off"), default="auto",
                        help="reorder candidates by introspective distance; auto chooses on the validation classes")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="candidates per validation query, as many as the server fetches")
    _calibration_arguments(parser)
    parser.add_argument("--ambiguity-quantile", type=float, default=0.9,
                        help="validation quantile of ||u||^2 above which a query is flagged ambiguous")
    parser.add_argument("--skip-test", action="store_true", help="do not measure the test classes")
    return parser


def _calibration_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ExportOptions()
    parser.add_argument("--isotonic", choices=("auto", "on", "off"), default="auto",
                        help="isotonic step after the logistic calibration; auto keeps it when it lowers held-out ECE")
    parser.add_argument("--top-model", choices=("auto", "on", "off"), default="auto",
                        help="separate confidence model of each query's most similar candidate; auto keeps it "
                             "when it lowers the held-out log loss of those candidates")
    parser.add_argument("--calibration-distractors", type=int, default=defaults.calibration_distractors,
                        help="at most this many training images, in whole classes, added to the validation "
                             "catalog as distractors when the confidence is fitted "
                             f"(default {defaults.calibration_distractors}; 0 for none)")
    parser.add_argument("--calibration-duplicates", type=float, default=defaults.calibration_duplicates,
                        help="fraction of validation queries that also find their own image, as a query "
                             f"that is in the catalog does (default {defaults.calibration_duplicates})")
    parser.add_argument("--calibration-protocol", choices=PROTOCOLS, default=defaults.calibration_protocol,
                        help="catalog each validation query searches: the images of other sources "
                             "(cross-source), every class one random image short (balanced), or all others "
                             "(leave-one-out); auto is cross-source where the data set records image sources")


def build_calibrate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idml-train calibrate",
        description="Refit the confidence calibration of a model bundle in place (the graph and model id stay).",
    )
    parser.add_argument("bundle", type=Path, help="bundle folder, e.g. models/default")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data set folder (default: the one recorded in the bundle)")
    parser.add_argument("--dataset", default=None,
                        help="kind of the data set at --data-root when it is not the bundle's own "
                             "(emoji, folder, csv, cub, cars, sop, inshop; see docs/dataset.md)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                        help="candidates per validation query, as many as the server fetches")
    _calibration_arguments(parser)
    parser.add_argument("--skip-test", action="store_true", help="do not measure the test classes")
    return parser


def _start_command(args: argparse.Namespace) -> None:
    """Set up logging and check the options that export and calibrate share."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.candidates < 1:
        raise SystemExit(f"--candidates must be at least 1, got {args.candidates}")
    if args.calibration_distractors < 0:
        raise SystemExit(f"--calibration-distractors must be at least 0, got {args.calibration_distractors}")
    if not 0.0 <= args.calibration_duplicates <= 1.0:
        raise SystemExit(f"--calibration-duplicates must be in [0, 1], got {args.calibration_duplicates}")


def _calibration_options(args: argparse.Namespace) -> dict:
    return {
        "candidates": args.candidates,
        "isotonic": args.isotonic,
        "top_model": args.top_model,
        "calibration_distractors": args.calibration_distractors,
        "calibration_duplicates": args.calibration_duplicates,
        "calibration_protocol": args.calibration_protocol,
    }


def calibrate_main(argv: list[str] | None = None) -> int:
    args = build_calibrate_parser().parse_args(argv)
    _start_command(args)
    options = ExportOptions(**_calibration_options(args), evaluate_test=not args.skip_test)
    if args.dataset is not None and args.data_root is None:
        raise SystemExit("--dataset needs --data-root, the folder of that data set")
    try:
        bundle = recalibrate_bundle(args.bundle, data_root=args.data_root, dataset_kind=args.dataset, options=options)
    except (BundleError, OSError, ValueError) as error:
        print(f"idml-train calibrate: error: {error}", file=sys.stderr)
        return 2
    report = bundle.manifest.evaluation.get("calibration_fit", {}) if bundle.manifest.evaluation else {}
    print(json.dumps({"bundle": str(bundle.path), "model_id": bundle.model_id, "calibration_fit": report}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _start_command(args)
    if not 0.0 < args.ambiguity_quantile < 1.0:
        raise SystemExit(f"--ambiguity-quantile must be in (0, 1), got {args.ambiguity_quantile}")
    options = ExportOptions(
        weights_dtype=args.weights_dtype,
        beta_form=args.beta_form,
        rerank=args.rerank,
        ambiguity_quantile=args.ambiguity_quantile,
        evaluate_test=not args.skip_test,
        **_calibration_options(args),
    )
    try:
        bundle = export_checkpoint(
            args.checkpoint,
            args.out,
            data_root=args.data_root,
            val_fraction=args.val_fraction,
            split_seed=args.split_seed,
            options=options,
        )
    except (BundleError, OSError, ValueError) as error:
        print(f"idml-train export: error: {error}", file=sys.stderr)
        return 2
    manifest = bundle.manifest
    logger.info(
        "bundle %s: model_id %s, input %d px, beta_form %s, rerank %s, calibration %s",
        bundle.path, manifest.model_id, manifest.input.size, manifest.metric.beta_form,
        manifest.metric.rerank, manifest.calibration.kind,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
