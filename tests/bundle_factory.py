"""Real ONNX model bundles and synthetic images for tests, built without torch.

`make_bundle` writes a bundle whose graph is a fixed random projection:

    image uint8 (batch, S, S, 3) -> Cast -> (x / 255 - 0.5) -> Reshape (batch, 3 S^2)
        -> MatMul W (3 S^2, d) -> LpNormalization      -> embedding   float32 (batch, d)
        -> MatMul V (3 S^2, du) -> Softplus -> * 0.25   -> uncertainty float32 (batch, du)

Different seeds give different weights and so different model ids. Distinct
random images land far apart, so a search by an item's own embedding finds it
first.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from index.bundle import FORMAT_VERSION, ModelBundle, load_bundle, model_id_of, write_manifest
from index.scoring import CONFIDENCE_FEATURES


def make_bundle(
    folder: str | Path,
    *,
    seed: int = 0,
    size: int = 32,
    embedding_dim: int = 16,
    uncertainty_dim: int = 8,
    beta_form: str = "sum",
) -> ModelBundle:
    """Write a bundle into `folder` (created) and return it loaded with `load_bundle`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    features = size * size * 3
    initializers = [
        numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "inv_255"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        numpy_helper.from_array(np.array(0.25, dtype=np.float32), "uncertainty_scale"),
        numpy_helper.from_array(
            (rng.standard_normal((features, embedding_dim)) / np.sqrt(features)).astype(np.float32),
            "semantic_weight",
        ),
        numpy_helper.from_array(
            (rng.standard_normal((features, uncertainty_dim)) / np.sqrt(features)).astype(np.float32),
            "uncertainty_weight",
        ),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels", "inv_255"], ["unit"]),
        helper.make_node("Sub", ["unit", "half"], ["centred"]),
        helper.make_node("Reshape", ["centred", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "semantic_weight"], ["projected"]),
        helper.make_node("LpNormalization", ["projected"], ["embedding"], axis=1, p=2),
        helper.make_node("MatMul", ["flat", "uncertainty_weight"], ["raw_uncertainty"]),
        helper.make_node("Softplus", ["raw_uncertainty"], ["positive_uncertainty"]),
        helper.make_node("Mul", ["positive_uncertainty", "uncertainty_scale"], ["uncertainty"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"random_projection_{seed}",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim]),
            helper.make_tensor_value_info("uncertainty", TensorProto.FLOAT, ["batch", uncertainty_dim]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))

    count = len(CONFIDENCE_FEATURES)
    write_manifest(
        folder,
        {
            "format_version": FORMAT_VERSION,
            "model_id": model_id_of(folder / "model.onnx"),
            "created_at": "2025-01-01T00:00:00Z",
            "backbone": f"random-projection-seed-{seed}",
            "input": {"size": size, "resize": size + size // 8},
            "outputs": {"embedding_dim": embedding_dim, "uncertainty_dim": uncertainty_dim},
            "metric": {"beta_form": beta_form, "shift": 4.0, "scale": 5.0, "rerank": True},
            "calibration": {
                "kind": "logistic",
                "features": list(CONFIDENCE_FEATURES),
                "mean": [0.5, 0.5, 0.3, 0.3, 0.0][:count] + [0.0] * max(0, count - 5),
                "std": [0.2, 0.3, 0.2, 0.2, 0.1][:count] + [1.0] * max(0, count - 5),
                "coef": [2.0, -1.5, -0.3, -0.3, 1.0][:count] + [0.0] * max(0, count - 5),
                "intercept": -0.5,
            },
            "ambiguity": {"threshold": 0.6, "quantile": 0.9},
            "training": {"note": "random projection built by tests/bundle_factory.py"},
            "dataset": {"name": "none", "classes": 0, "images": 0},
            "evaluation": {},
        },
    )
    return load_bundle(folder)


def make_image_bytes(seed: int, *, size: int = 40, image_format: str = "PNG") -> bytes:
    """An encoded image with random noise plus a coloured shape; distinct seeds give distinct images."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(value) for value in rng.integers(0, 256, size=3))
    box = sorted(rng.integers(0, size, size=2).tolist())
    if seed % 2:
        draw.ellipse([box[0], box[0], box[1] + 1, box[1] + 1], fill=colour)
    else:
        draw.rectangle([box[0], box[0], box[1] + 1, box[1] + 1], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def unit_vectors(count: int, dimension: int, seed: int = 0) -> np.ndarray:
    """float32 (count, dimension) random L2-normalised vectors."""
    vectors = np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_conv_bundle(folder: str | Path, *, seed: int = 0, size: int = 224, embedding_dim: int = 128) -> ModelBundle:
    """A bundle with a small random convolutional network, for throughput benchmarks.

    Four 3x3 stride-2 convolutions (3 -> 32 -> 64 -> 128 -> 256 channels) with
    ReLU, global average pooling and linear heads: about 0.37 GFLOP (2 per
    multiply-add) per 224 x 224 image, half of EfficientNet-Lite0's 0.77 by
    the same count. It ran 3.5x faster than EfficientNet-Lite0 in onnxruntime
    (465 against 131 images/s, 2 threads, batch 32), so it stands for a model
    whose cost dominates decoding, not for Lite0 itself.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = [3, 32, 64, 128, 256]
    initializers = [
        numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "inv_255"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        numpy_helper.from_array(np.array(0.25, dtype=np.float32), "uncertainty_scale"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pixels", "inv_255"], ["unit"]),
        helper.make_node("Sub", ["unit", "half"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["x0"], perm=[0, 3, 1, 2]),
    ]
    for layer, (inputs, outputs) in enumerate(zip(channels[:-1], channels[1:])):
        weight = (rng.standard_normal((outputs, inputs, 3, 3)) * np.sqrt(2.0 / (9 * inputs))).astype(np.float32)
        initializers.append(numpy_helper.from_array(weight, f"conv{layer}_weight"))
        nodes.append(helper.make_node("Conv", [f"x{layer}", f"conv{layer}_weight"], [f"c{layer}"],
                                      kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{layer}"], [f"x{layer + 1}"]))
    last = f"x{len(channels) - 1}"
    initializers += [
        numpy_helper.from_array(
            (rng.standard_normal((channels[-1], embedding_dim)) / np.sqrt(channels[-1])).astype(np.float32),
            "semantic_weight",
        ),
        numpy_helper.from_array(
            (rng.standard_normal((channels[-1], 8)) / np.sqrt(channels[-1])).astype(np.float32), "uncertainty_weight"
        ),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "semantic_weight"], ["projected"]),
        helper.make_node("LpNormalization", ["projected"], ["embedding"], axis=1, p=2),
        helper.make_node("MatMul", ["features", "uncertainty_weight"], ["raw_uncertainty"]),
        helper.make_node("Softplus", ["raw_uncertainty"], ["positive_uncertainty"]),
        helper.make_node("Mul", ["positive_uncertainty", "uncertainty_scale"], ["uncertainty"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"random_conv_{seed}",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim]),
            helper.make_tensor_value_info("uncertainty", TensorProto.FLOAT, ["batch", 8]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((make_bundle(folder / "_template", size=32).path / "model.json").read_text())
    manifest.update(
        model_id=model_id_of(folder / "model.onnx"),
        backbone=f"random-conv-seed-{seed}",
        input={"size": size, "resize": size * 8 // 7},
        outputs={"embedding_dim": embedding_dim, "uncertainty_dim": 8},
    )
    write_manifest(folder, manifest)
    return load_bundle(folder)
