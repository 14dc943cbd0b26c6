"""The serving side (`index/`, `service/`) runs without torch.

The serving install has no torch, so `index` and `service` must neither
import it nor import `training`, which does. A subprocess makes `import torch`
fail, imports every module of both packages, loads a bundle and embeds and
scores an image. An AST walk catches imports on code paths that the
subprocess does not run.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from index.bundle import FORMAT_VERSION, model_id_of, write_manifest
from index.scoring import CONFIDENCE_FEATURES

REPOSITORY = Path(__file__).resolve().parents[1]
SERVING_PACKAGES = ("index", "service")
FORBIDDEN_TOP_LEVEL = {"torch", "torchvision", "training"}
SIZE = 16


def serving_files() -> list[Path]:
    files = []
    for package in SERVING_PACKAGES:
        files += sorted((REPOSITORY / package).rglob("*.py"))
    return files


def forbidden_imports(path: Path) -> list[str]:
    """`module (line N)` for each import of a FORBIDDEN_TOP_LEVEL module in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{name} (line {node.lineno})" for name in names if name.split(".")[0] in FORBIDDEN_TOP_LEVEL]
    return found


def test_serving_sources_do_not_import_torch():
    files = serving_files()
    assert any(path.name == "scoring.py" for path in files)  # the walk found the packages

    offenders = {str(path.relative_to(REPOSITORY)): forbidden_imports(path) for path in files}

    assert {path: names for path, names in offenders.items() if names} == {}


def test_ast_check_catches_import(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("import os\nfrom torch import nn\nimportlib.import_module('torchvision.ops')\n")

    assert forbidden_imports(source) == ["torch (line 2)", "torchvision.ops (line 3)"]


def write_tiny_bundle(folder: Path) -> Path:
    """A valid bundle without torch: uint8 (n, 16, 16, 3) -> channel means -> linear heads."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    semantic = numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "semantic_weight")
    uncertainty = numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "uncertainty_weight")
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["means"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["means", "semantic_weight"], ["projected"]),
        helper.make_node("LpNormalization", ["projected"], ["embedding"], axis=1, p=2),
        helper.make_node("MatMul", ["means", "uncertainty_weight"], ["raw_uncertainty"]),
        helper.make_node("Softplus", ["raw_uncertainty"], ["uncertainty"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("uncertainty", TensorProto.FLOAT, ["batch", 4]),
        ],
        initializer=[semantic, uncertainty],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))
    features = len(CONFIDENCE_FEATURES)
    write_manifest(folder, {
        "format_version": FORMAT_VERSION,
        "model_id": model_id_of(folder / "model.onnx"),
        "created_at": "2025-01-01T00:00:00+00:00",
        "backbone": "channel-means",
        "input": {"size": SIZE, "resize": 18},
        "outputs": {"embedding_dim": 8, "uncertainty_dim": 4},
        "metric": {"beta_form": "sum", "shift": 4.0, "scale": 5.0, "rerank": True},
        "calibration": {
            "kind": "logistic",
            "features": list(CONFIDENCE_FEATURES),
            "mean": [0.0] * features,
            "std": [1.0] * features,
            "coef": [4.0] + [0.0] * (features - 1),
            "intercept": -2.0,
        },
        "ambiguity": {"threshold": 1.0, "quantile": 0.9},
        "training": {},
        "dataset": {"name": "none"},
        "evaluation": {},
    })
    return folder


CHILD = textwrap.dedent(
    """
    import importlib, io, json, pkgutil, sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    bundle_path, packages = sys.argv[1], sys.argv[2].split(",")

    imported = []
    for package_name in packages:
        package = importlib.import_module(package_name)
        imported.append(package_name)
        for module in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            importlib.import_module(module.name)
            imported.append(module.name)

    import numpy as np
    from PIL import Image
    from index.bundle import load_bundle
    from index.embedder import Embedder
    from index.preprocess import preprocess_bytes
    from index.scoring import confidence_features, introspective_distance, pair_beta

    bundle = load_bundle(bundle_path)
    buffer = io.BytesIO()
    Image.new("RGBA", (30, 20), (200, 30, 30, 128)).save(buffer, format="PNG")
    pixels = preprocess_bytes(buffer.getvalue(), bundle.preprocess)
    outputs = Embedder(bundle).embed(np.stack([pixels, 255 - pixels]))
    similarity = outputs.embedding[1:] @ outputs.embedding[0]
    scalars = outputs.uncertainty_scalar
    beta = pair_beta(bundle.metric, scalars[0], scalars[1:])
    distance = introspective_distance(similarity, beta, bundle.metric)
    confidence = bundle.calibration.predict(confidence_features(similarity, distance, scalars[0], scalars[1:]))
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "training")
                    and sys.modules[name] is not None)
    print(json.dumps({"imported": imported, "loaded": loaded,
                      "shape": list(outputs.embedding.shape), "confidence": float(confidence[0])}))
    """
)


def test_serving_runs_without_torch(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "bundle")
    packages = [name for name in SERVING_PACKAGES if (REPOSITORY / name / "__init__.py").is_file()]

    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), ",".join(packages)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert "index.scoring" in report["imported"]
    assert report["shape"] == [2, 8]
    assert 0.0 <= report["confidence"] <= 1.0
