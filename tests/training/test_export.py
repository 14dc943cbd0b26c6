"""ONNX export and model bundles: graph parity, manifest validation, one preprocessing path.

One small bundle is exported once per module through the `idml-train export`
entry point. Its model is an EfficientNet-Lite0 with random weights at 64 x 64
pixels. Its data set is a synthetic folder of 12 classes with 4 images each,
PNG and JPEG in several Pillow modes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageDraw

from index.bundle import BundleError, load_bundle, model_id_of
from index.embedder import Embedder
from index.imaging import decode_image
from index.preprocess import preprocess_bytes
from index.scoring import CONFIDENCE_FEATURES
from training.checkpoint import load_model_from_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import load_dataset
from training.data.transforms import EvalTransform
from training.export import (
    FLOAT32_TOLERANCE,
    REDUCED_PRECISION_MIN_COSINE,
    ExportOptions,
    build_bundle,
    check_parity,
    convert_weights_float16,
    convert_weights_int8,
    main,
    torch_outputs,
)
from training.model import build_model

IMAGE_SIZE = 64
DEMO_CATALOG = Path(__file__).resolve().parents[2] / "demo" / "catalog"
COLOURS = [(220, 40, 40), (40, 160, 60), (40, 70, 200), (230, 200, 40), (150, 60, 170), (30, 30, 30)]
SHAPES = ["ellipse", "rectangle"]


def draw_class_image(label: int, variant: int) -> Image.Image:
    """An RGBA image of class `label`: its colour and shape, drawn a little differently per variant."""
    rng = np.random.default_rng(label * 10 + variant)
    side = 40 + 8 * variant
    image = Image.new("RGBA", (side + 6 * (variant % 2), side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    margin = 4 + variant
    box = (margin, margin, image.width - margin, image.height - margin)
    colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[label % len(COLOURS)])
    getattr(draw, SHAPES[label // len(COLOURS) % len(SHAPES)])(box, fill=colour + (255,))
    return image


def save_variant(image: Image.Image, folder: Path, variant: int) -> None:
    """Save in the variant's file format and Pillow mode: RGBA PNG, P PNG, RGB JPEG, L JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    if variant == 0:
        image.save(folder / "v0.png")
    elif variant == 1:
        image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / "v1.png")
    elif variant == 2:
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        background.save(folder / "v2.jpg", quality=90)
    else:
        image.convert("RGB").convert("L").save(folder / "v3.jpg", quality=90)


def write_dataset(root: Path, train_classes: int = 8, test_classes: int = 4) -> Path:
    """A folder data set: root/{train,test}/<class>/<variant>.{png,jpg}, 4 images per class."""
    for label in range(train_classes + test_classes):
        split = "train" if label < train_classes else "test"
        for variant in range(4):
            save_variant(draw_class_image(label, variant), root / split / f"class{label:02d}", variant)
    return root


def tiny_config(root: Path) -> dict:
    config = TrainConfig()
    config.model.pretrained = False
    config.model.embedding_dim = 32
    config.model.uncertainty_dim = 8
    config.data.dataset = "folder"
    config.data.root = str(root)
    config.data.image_size = IMAGE_SIZE
    return config.to_dict()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(bundle folder, checkpoint path, data root), exported through the CLI entry point."""
    base = tmp_path_factory.mktemp("export")
    root = write_dataset(base / "data")
    config = tiny_config(root)
    torch.manual_seed(0)
    from training.config import config_from_dict

    model = build_model(config_from_dict(config).model, pretrained=False).eval()
    checkpoint = base / "tiny.pt"
    save_checkpoint(checkpoint, model=model, proxies=None, optimizer=None, scheduler=None,
                    epoch=1, config=config, metrics={"map_at_r": 0.1}, best={"epoch": 1})
    out = base / "bundle"
    assert main([str(checkpoint), "--out", str(out), "--val-fraction", "0.5"]) == 0
    return out, checkpoint, root


@pytest.fixture(scope="module")
def model(exported):
    model, _ = load_model_from_checkpoint(exported[1])
    return model


def test_graph_passes_checker_and_io_contract(exported):
    bundle_path = exported[0]
    proto = onnx.load(str(bundle_path / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)

    session = ort.InferenceSession(str(bundle_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "image"
    assert image_input.type == "tensor(uint8)"
    assert image_input.shape[1:] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert isinstance(image_input.shape[0], str)  # dynamic batch
    outputs = {output.name: output for output in session.get_outputs()}
    assert set(outputs) == {"embedding", "uncertainty"}
    assert outputs["embedding"].shape[1] == 32
    assert outputs["uncertainty"].shape[1] == 8
    assert outputs["embedding"].type == outputs["uncertainty"].type == "tensor(float)"


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_onnxruntime_matches_torch(exported, model, batch_size):
    rng = np.random.default_rng(batch_size)
    images = rng.integers(0, 256, size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(exported[0] / "model.onnx"), providers=["CPUExecutionProvider"])

    embedding, uncertainty = session.run(["embedding", "uncertainty"], {"image": images})
    expected_embedding, expected_uncertainty = torch_outputs(model, images)

    assert embedding.shape == (batch_size, 32)
    assert np.abs(embedding - expected_embedding).max() <= FLOAT32_TOLERANCE
    assert np.abs(uncertainty - expected_uncertainty).max() <= FLOAT32_TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_manifest_records_choices_and_evaluation(exported):
    bundle = load_bundle(exported[0])
    manifest = bundle.manifest

    assert manifest.model_id == model_id_of(exported[0] / "model.onnx")
    assert manifest.input.size == IMAGE_SIZE
    assert manifest.input.resize == round(IMAGE_SIZE * 8 / 7)
    assert (manifest.outputs.embedding_dim, manifest.outputs.uncertainty_dim) == (32, 8)
    assert manifest.metric.shift == 4.0
    assert manifest.metric.scale == 5.0
    assert manifest.training["model"]["embedding_dim"] == 32
    assert manifest.dataset["name"] == "folder"
    assert manifest.dataset["classes"] == {"train": 4, "val": 4, "test": 4}
    assert manifest.dataset["images"] == {"train": 16, "val": 16, "test": 16}
    assert manifest.calibration.features == list(CONFIDENCE_FEATURES)

    evaluation = manifest.evaluation
    table = evaluation["scoring_questions"]["table"]
    assert {(row["beta_form"], row["rerank"]) for row in table} == {
        ("sum", False), ("sum", True), ("diff", False), ("diff", True)
    }
    assert evaluation["checkpoint"]["metrics"] == {"map_at_r": 0.1}
    for split in ("val", "test"):
        assert 0.0 <= evaluation[split]["served"]["map_at_r"] <= 1.0
        assert 0.0 <= evaluation[split]["calibration"]["ece_returned"] <= 1.0
    assert evaluation["export_check"]["max_abs_embedding"] <= FLOAT32_TOLERANCE
    probability = bundle.calibration.predict(np.zeros((3, len(CONFIDENCE_FEATURES))))
    assert probability.shape == (3,)


def edited_copy(bundle_path: Path, target: Path, edit) -> Path:
    """Copy a bundle and apply `edit(record)` to its model.json."""
    shutil.copytree(bundle_path, target)
    record = json.loads((target / "model.json").read_text())
    edit(record)
    (target / "model.json").write_text(json.dumps(record))
    return target


def _set(path: list[str], value):
    def edit(record):
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(path: list[str]):
    def edit(record):
        node = record
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_delete(["calibration"]), "calibration: Field required"),
        (_delete(["metric", "beta_form"]), "metric.beta_form: Field required"),
        (_set(["outputs", "embedding_dim"], 64), "embedding_dim is 64"),
        (_set(["outputs", "uncertainty_dim"], 3), "uncertainty_dim is 3"),
        (_set(["input", "size"], 48), "input.size 48"),
        (_set(["model_id"], "0123456789abcdef"), "model_id 0123456789abcdef does not match"),
        (_set(["calibration", "coef"], [1.0, 2.0]), "calibration.coef has 2 values"),
        (_set(["input", "resize"], 60), "input.resize (60) is smaller than input.size (64)"),
        (_set(["metric", "beta_form"], "product"), "metric.beta_form"),
    ],
    ids=["missing-section", "missing-field", "embedding-dim", "uncertainty-dim", "input-size",
         "model-id", "calibration-length", "resize-below-size", "unknown-beta-form"],
)
def test_load_bundle_rejects_bad_manifest(exported, tmp_path, edit, expected):
    broken = edited_copy(exported[0], tmp_path / "broken", edit)

    with pytest.raises(BundleError) as caught:
        load_bundle(broken)

    assert expected in str(caught.value)


def test_load_bundle_rejects_edited_graph(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported[0], broken)
    with open(broken / "model.onnx", "ab") as handle:
        handle.write(b"\0")

    with pytest.raises(BundleError, match="model_id .* does not match"):
        load_bundle(broken)


def sample_files(tmp_path: Path) -> list[Path]:
    """Demo emoji (RGBA PNG) when the demo catalog is present, plus synthetic files of several modes."""
    files = sorted(DEMO_CATALOG.glob("*/*.png"))[:6] if DEMO_CATALOG.is_dir() else []
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    synthetic = {
        "rgb.jpg": Image.fromarray(noise),
        "gray.jpg": Image.fromarray(noise[:, :, 0]),
        "cmyk.jpg": Image.fromarray(noise).convert("CMYK"),
        "palette.png": Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "rgba.png": draw_class_image(2, 1),
        "tall16.png": Image.fromarray((noise[:, :40, 1].astype(np.uint16) * 257)),
    }
    for name, image in synthetic.items():
        image.save(tmp_path / name)
        files.append(tmp_path / name)
    return files


def test_training_and_serving_paths_agree(exported, model, tmp_path):
    bundle = load_bundle(exported[0])
    files = sample_files(tmp_path)
    transform = EvalTransform(bundle.preprocess)

    training_pixels = torch.stack([transform(decode_image(path.read_bytes()).image) for path in files])
    with torch.no_grad():
        training_embedding, _ = model.embed_images(training_pixels)
    serving_pixels = np.stack([preprocess_bytes(path.read_bytes(), bundle.preprocess) for path in files])
    serving = Embedder(bundle).embed(serving_pixels)

    np.testing.assert_array_equal(training_pixels.permute(0, 2, 3, 1).numpy(), serving_pixels)
    cosine = np.sum(training_embedding.numpy() * serving.embedding, axis=1)
    assert cosine.min() > 0.999
    # Different images of the set stay apart, so 0.999 separates same from different.
    off_diagonal = serving.embedding @ serving.embedding.T - 2 * np.eye(len(files))
    assert off_diagonal.max() < 0.999


@pytest.mark.parametrize("weights_dtype", ["float16", "int8"])
def test_reduced_precision_weights(exported, model, tmp_path, weights_dtype):
    source = exported[0] / "model.onnx"
    target = tmp_path / f"{weights_dtype}.onnx"
    spec = load_bundle(exported[0]).preprocess
    images = np.stack([preprocess_bytes(path.read_bytes(), spec) for path in sorted(exported[2].rglob("v*.*"))])

    if weights_dtype == "float16":
        convert_weights_float16(source, target)
    else:
        convert_weights_int8(source, target, images[::2])
    report = check_parity(model, target, size=IMAGE_SIZE, weights_dtype=weights_dtype,
                          images=images[1::2], batch_sizes=(1, 7))

    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert [output.type for output in session.get_outputs()] == ["tensor(float)", "tensor(float)"]
    assert target.stat().st_size < 0.6 * source.stat().st_size
    assert report["mean_cosine"] >= REDUCED_PRECISION_MIN_COSINE[weights_dtype]


def test_failed_export_keeps_old_bundle(exported, model, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(exported[0], out)
    before = (out / "model.json").read_text()
    splits = load_dataset("folder", exported[2], val_fraction=0.5, seed=0)
    config = load_bundle(out).manifest.training

    with pytest.raises(ValueError, match="weights_dtype"):
        build_bundle(model, config, splits, out, options=ExportOptions(weights_dtype="bfloat16"))

    assert (out / "model.json").read_text() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]


def test_export_rejects_non_bundle_folder(exported, model, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.txt").write_text("keep me")
    splits = load_dataset("folder", exported[2], val_fraction=0.5, seed=0)

    with pytest.raises(ValueError, match="not a model bundle folder"):
        build_bundle(model, load_bundle(exported[0]).manifest.training, splits, out)

    assert (out / "README.txt").read_text() == "keep me"


def test_load_bundle_rejects_top_model_with_other_features(exported, tmp_path):
    def edit(record):
        top = dict(record["calibration"])
        top["features"] = list(reversed(top["features"]))
        record["calibration"]["top"] = top

    broken = edited_copy(exported[0], tmp_path / "broken", edit)
    with pytest.raises(BundleError) as caught:
        load_bundle(broken)
    assert "calibration.top.features" in str(caught.value)


def test_calibrate_refits_in_place(exported, tmp_path, capsys):
    from training.export import calibrate_main

    bundle_path = tmp_path / "bundle"
    shutil.copytree(exported[0], bundle_path)
    before = load_bundle(bundle_path)

    assert calibrate_main([str(bundle_path), "--data-root", str(exported[2]), "--calibration-distractors", "10"]) == 0

    after = load_bundle(bundle_path)
    assert after.model_id == before.model_id
    fit = after.manifest.evaluation["calibration_fit"]
    assert 0 < fit["distractors"] <= 10  # whole training classes, at most 10 images
    assert fit["dataset"]["name"] == "folder"
    assert after.manifest.dataset == before.manifest.dataset
    assert after.manifest.metric == before.manifest.metric
    assert 0.0 <= after.manifest.evaluation["test"]["calibration"]["ece_returned"] <= 1.0
    assert json.loads(capsys.readouterr().out)["model_id"] == before.model_id
    assert not list(bundle_path.glob(".model.json*"))  # the staging file was renamed away


def test_calibrate_rejects_dataset_without_root(exported):
    from training.export import calibrate_main

    with pytest.raises(SystemExit) as caught:
        calibrate_main([str(exported[0]), "--dataset", "folder"])
    assert "--data-root" in str(caught.value)


def test_calibrate_reports_write_failure(exported, tmp_path, capsys):
    from training.export import calibrate_main

    bundle_path = tmp_path / "bundle"
    shutil.copytree(exported[0], bundle_path)
    before = (bundle_path / "model.json").read_bytes()
    (bundle_path / ".model.json.tmp").mkdir()  # the staging file cannot be written

    code = calibrate_main([str(bundle_path), "--data-root", str(exported[2]), "--skip-test"])

    assert code == 2
    assert "idml-train calibrate: error:" in capsys.readouterr().err
    assert (bundle_path / "model.json").read_bytes() == before


def test_load_bundle_names_a_file_given_as_folder(exported, tmp_path):
    not_a_folder = tmp_path / "model.json"
    shutil.copy(exported[0] / "model.json", not_a_folder)

    with pytest.raises(BundleError) as caught:
        load_bundle(not_a_folder)
    assert "is not a folder" in str(caught.value)


def test_calibrate_skip_test_drops_old_test_figures(exported, tmp_path):
    from training.export import calibrate_main

    bundle_path = tmp_path / "bundle"
    shutil.copytree(exported[0], bundle_path)
    assert "test" in load_bundle(bundle_path).manifest.evaluation

    assert calibrate_main([str(bundle_path), "--data-root", str(exported[2]), "--skip-test"]) == 0

    evaluation = load_bundle(bundle_path).manifest.evaluation
    assert "test" not in evaluation
    assert "val" in evaluation
