"""Model bundles: a folder with `model.onnx` and `model.json`.

The server and the indexer get everything they need from a trained model
through a bundle and never import torch. `load_bundle` validates `model.json`
against `BundleManifest` and against the ONNX graph, and rejects a bundle whose
fields are missing or inconsistent with an error that names the field.

ONNX graph contract:
    input  `image`        uint8  (batch, size, size, 3), RGB, NHWC; pixel
                          normalisation happens inside the graph
    output `embedding`    float32 (batch, embedding_dim), L2-normalised
    output `uncertainty`  float32 (batch, uncertainty_dim)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from index.fsync import fsync_dir, fsync_file
from index.preprocess import PreprocessSpec
from index.scoring import CONFIDENCE_FEATURES, Calibration, MetricSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "model.json"
ONNX_NAME = "model.onnx"


class BundleError(ValueError):
    """A model bundle that cannot be used; the message names the file and field."""


class InputSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "image"  # ONNX input name
    size: int = Field(ge=16, le=1024)  # side of the square input, pixels
    resize: int = Field(ge=16, le=2048)  # shorter side before the centre crop, pixels
    crop: Literal["center"] = "center"
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["uint8"] = "uint8"
    color: Literal["RGB"] = "RGB"

    @model_validator(mode="after")
    def _resize_covers_crop(self) -> "InputSection":
        if self.resize < self.size:
            raise ValueError(f"input.resize ({self.resize}) is smaller than input.size ({self.size})")
        return self


class OutputSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embedding_name: str = "embedding"
    uncertainty_name: str = "uncertainty"
    embedding_dim: int = Field(ge=2, le=8192)
    uncertainty_dim: int = Field(ge=1, le=8192)


class MetricSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta_form: Literal["sum", "diff"]  # how the pair uncertainty is formed
    shift: float = Field(ge=0.0)
    scale: float = Field(gt=0.0)
    rerank: bool = True  # whether search reorders candidates by introspective distance


class CalibrationSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["logistic", "logistic+isotonic"]
    features: list[str] = Field(min_length=1)
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    isotonic_x: list[float] | None = None
    isotonic_y: list[float] | None = None
    # Model of each query's most similar candidate; same features, no `top` of its own.
    top: "CalibrationSection | None" = None

    @model_validator(mode="after")
    def _consistent(self) -> "CalibrationSection":
        unknown = [name for name in self.features if name not in CONFIDENCE_FEATURES]
        if unknown:
            raise ValueError(
                f"calibration.features has unknown names {unknown}; known: {list(CONFIDENCE_FEATURES)}"
            )
        count = len(self.features)
        for field in ("mean", "std", "coef"):
            if len(getattr(self, field)) != count:
                raise ValueError(
                    f"calibration.{field} has {len(getattr(self, field))} values "
                    f"but calibration.features has {count}"
                )
        if any(value <= 0 for value in self.std):
            raise ValueError("calibration.std must be positive")
        if self.kind == "logistic+isotonic":
            if not self.isotonic_x or not self.isotonic_y:
                raise ValueError("calibration.kind is 'logistic+isotonic' but isotonic_x/isotonic_y are missing")
            if len(self.isotonic_x) != len(self.isotonic_y):
                raise ValueError("calibration.isotonic_x and isotonic_y differ in length")
        if self.top is not None:
            if self.top.features != self.features:
                raise ValueError(
                    f"calibration.top.features {self.top.features} differ from calibration.features {self.features}"
                )
            if self.top.top is not None:
                raise ValueError("calibration.top has a top model of its own; only one level is allowed")
        return self


class AmbiguitySection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(ge=0.0)  # query uncertainty ||u||^2 above this is "ambiguous"
    quantile: float = Field(gt=0.0, lt=1.0)  # quantile of validation queries the threshold sits at


class BundleManifest(BaseModel):
    """Schema of `model.json`."""

    model_config = ConfigDict(extra="forbid")

    format_version: int
    model_id: str = Field(min_length=8)  # first 16 hex digits of sha256(model.onnx)
    created_at: str
    backbone: str
    input: InputSection
    outputs: OutputSection
    metric: MetricSection
    calibration: CalibrationSection
    ambiguity: AmbiguitySection
    training: dict[str, Any]  # resolved training config
    dataset: dict[str, Any]  # data set name, root, class and image counts
    evaluation: dict[str, Any]  # metrics on validation and test classes
    weights_dtype: Literal["float32", "float16", "int8"] = "float32"

    @model_validator(mode="after")
    def _version(self) -> "BundleManifest":
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (this version reads {FORMAT_VERSION})"
            )
        return self


@dataclass(frozen=True)
class ModelBundle:
    """A validated bundle on disk."""

    path: Path
    manifest: BundleManifest

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_NAME

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(size=self.manifest.input.size, resize=self.manifest.input.resize)

    @property
    def metric(self) -> MetricSpec:
        section = self.manifest.metric
        return MetricSpec(beta_form=section.beta_form, shift=section.shift, scale=section.scale)

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_json(self.manifest.calibration.model_dump())


def model_id_of(onnx_path: Path) -> str:
    """Content hash of an ONNX file: the first 16 hex digits of its sha256."""
    digest = hashlib.sha256()
    with open(onnx_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_bundle(path: str | Path, *, check_graph: bool = True) -> ModelBundle:
    """Load and validate the bundle in folder `path`.

    `check_graph` also opens the ONNX graph with onnxruntime and checks input
    and output names, dtypes and shapes against the manifest, and the model id
    against the file's hash.

    Raises:
        BundleError: a file is missing, `model.json` is invalid, or the
            manifest contradicts the graph. The message names the field.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    onnx_path = folder / ONNX_NAME
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise BundleError(f"model bundle folder {folder} {problem}; give the folder that contains model.json")
    for required in (manifest_path, onnx_path):
        if not required.is_file():
            raise BundleError(f"model bundle {folder} is missing {required.name}")
    try:
        record = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON: {error}") from None
    try:
        manifest = BundleManifest.model_validate(record)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(root)'}: {item['msg']}"
            for item in error.errors()
        )
        raise BundleError(f"{manifest_path} is invalid: {problems}") from None

    bundle = ModelBundle(path=folder, manifest=manifest)
    if check_graph:
        _check_graph(bundle)
    return bundle


def _check_graph(bundle: ModelBundle) -> None:
    import onnxruntime as ort

    manifest = bundle.manifest
    actual_id = model_id_of(bundle.onnx_path)
    if actual_id != manifest.model_id:
        raise BundleError(
            f"{bundle.path / MANIFEST_NAME}: model_id {manifest.model_id} does not match "
            f"the hash of {ONNX_NAME} ({actual_id}); the bundle was edited after export"
        )
    try:
        session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise BundleError(f"{bundle.onnx_path} cannot be loaded by onnxruntime: {error}") from None

    inputs = {node.name: node for node in session.get_inputs()}
    spec = manifest.input
    if spec.name not in inputs:
        raise BundleError(f"input.name {spec.name!r} is not an input of the graph (inputs: {list(inputs)})")
    node = inputs[spec.name]
    if node.type != "tensor(uint8)":
        raise BundleError(f"graph input {spec.name!r} has type {node.type}, expected tensor(uint8)")
    shape = list(node.shape)
    if len(shape) != 4 or shape[1:] != [spec.size, spec.size, 3]:
        raise BundleError(
            f"graph input {spec.name!r} has shape {shape}, but input.size {spec.size} "
            f"needs [batch, {spec.size}, {spec.size}, 3]"
        )

    outputs = {node.name: node for node in session.get_outputs()}
    expected = {
        manifest.outputs.embedding_name: ("outputs.embedding_dim", manifest.outputs.embedding_dim),
        manifest.outputs.uncertainty_name: ("outputs.uncertainty_dim", manifest.outputs.uncertainty_dim),
    }
    for name, (field, dim) in expected.items():
        if name not in outputs:
            raise BundleError(f"output {name!r} is not an output of the graph (outputs: {list(outputs)})")
        out_shape = list(outputs[name].shape)
        if len(out_shape) != 2 or out_shape[1] != dim:
            raise BundleError(f"graph output {name!r} has shape {out_shape}, but {field} is {dim}")
    if manifest.metric.beta_form == "diff" and manifest.outputs.uncertainty_dim < 1:
        raise BundleError("metric.beta_form 'diff' needs an uncertainty embedding")


def write_manifest(folder: str | Path, manifest: BundleManifest | dict) -> Path:
    """Validate and write `model.json` into `folder`; returns its path.

    The file is written beside, flushed and renamed over the old one, so a
    crash leaves the old manifest or the new one, never a torn file.
    """
    if isinstance(manifest, dict):
        manifest = BundleManifest.model_validate(manifest)
    path = Path(folder) / MANIFEST_NAME
    staging = path.with_name(f".{MANIFEST_NAME}.tmp")
    staging.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    fsync_file(staging)
    os.replace(staging, path)
    fsync_dir(path.parent)
    return path
