"""Data set layouts: each reader on a tiny synthetic copy of its layout, and the split rules."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from training.data import DatasetLayoutError, DatasetSplits, load_dataset
from training.data.splits import build_splits, choose_val_classes, split_classes_in_half


def write_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 255 - value, 40)).save(path)
    return path


def check_class_disjoint(splits: DatasetSplits) -> None:
    train = {sample.class_name for sample in splits.train}
    val = {sample.class_name for sample in splits.val}
    test = {sample.class_name for sample in splits.test}
    assert not train & val
    assert not train & test
    assert not val & test


def check_labels(splits: DatasetSplits) -> None:
    for sample in [*splits.train, *splits.val, *splits.test]:
        assert splits.class_names[sample.label] == sample.class_name
    assert sorted({sample.label for sample in splits.train}) == list(range(splits.num_train_classes))


def make_class_folders(root: Path, classes: list[str], images_per_class: int = 2) -> None:
    for index, name in enumerate(classes):
        for image_index in range(images_per_class):
            write_image(root / name / f"{image_index}.png", value=10 * index + image_index)


def test_folder_splits_sorted_classes_in_half(tmp_path):
    classes = [f"class_{index:02d}" for index in range(10)]
    make_class_folders(tmp_path, classes)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "class_00" / "notes.txt").write_text("not an image")

    splits = load_dataset("folder", tmp_path, val_fraction=0.2, seed=3)

    train_and_val = {sample.class_name for sample in [*splits.train, *splits.val]}
    assert train_and_val == set(classes[:5])
    assert {sample.class_name for sample in splits.test} == set(classes[5:])
    assert splits.num_val_classes == 1
    assert splits.num_train_classes == 4
    assert len(splits.train) == 8
    assert len(splits.test) == 10
    check_class_disjoint(splits)
    check_labels(splits)


def test_folder_with_train_test_subfolders(tmp_path):
    make_class_folders(tmp_path / "train", ["a", "b", "c"])
    make_class_folders(tmp_path / "test", ["d", "e"])

    splits = load_dataset("folder", tmp_path, val_fraction=0.0)

    assert {sample.class_name for sample in splits.train} == {"a", "b", "c"}
    assert {sample.class_name for sample in splits.test} == {"d", "e"}
    assert splits.val == []


def test_folder_rejects_class_in_both_splits(tmp_path):
    make_class_folders(tmp_path / "train", ["a", "b"])
    make_class_folders(tmp_path / "test", ["b", "c"])

    with pytest.raises(DatasetLayoutError, match="class-disjoint"):
        load_dataset("folder", tmp_path)


def test_folder_without_images_raises(tmp_path):
    (tmp_path / "empty_class").mkdir()

    with pytest.raises(DatasetLayoutError, match="no images"):
        load_dataset("folder", tmp_path)


def test_emoji_layout(tmp_path):
    for split, classes in (("train", ["1f600", "1f601", "1f602", "1f603", "1f604"]), ("test", ["2764", "1f525"])):
        for name in classes:
            for vendor in ("google", "twitter", "openmoji", "fluent"):
                write_image(tmp_path / split / name / f"{vendor}.png")
    (tmp_path / "READY").write_text("{}")

    splits = load_dataset("emoji", tmp_path, val_fraction=0.2, seed=0)

    assert splits.num_train_classes == 4
    assert splits.num_val_classes == 1
    assert splits.num_test_classes == 2
    assert len(splits.test) == 8
    check_class_disjoint(splits)
    check_labels(splits)


def test_emoji_missing_folder_names_the_build_script(tmp_path):
    with pytest.raises(DatasetLayoutError, match="fetch_emoji_dataset.py"):
        load_dataset("emoji", tmp_path)


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_with_split_column(tmp_path):
    rows = []
    for index, (label, split) in enumerate([("cat", "train"), ("cat", "train"), ("dog", "train"), ("owl", "test")]):
        write_image(tmp_path / "images" / f"{index}.png")
        rows.append({"path": f"images/{index}.png", "label": label, "split": split, "extra": "ignored"})
    manifest = write_manifest(tmp_path / "manifest.csv", rows)

    splits = load_dataset("csv", manifest, val_fraction=0.0)

    assert [sample.class_name for sample in splits.train] == ["cat", "cat", "dog"]
    assert [sample.class_name for sample in splits.test] == ["owl"]
    assert splits.train[0].path == tmp_path / "images" / "0.png"


def test_csv_without_split_column_halves_classes(tmp_path):
    rows = []
    for index, label in enumerate(["d", "a", "c", "b", "a"]):
        write_image(tmp_path / f"{index}.png")
        rows.append({"path": f"{index}.png", "label": label})
    manifest = write_manifest(tmp_path / "manifest.csv", rows)

    splits = load_dataset("csv", manifest, val_fraction=0.0)

    assert {sample.class_name for sample in splits.train} == {"a", "b"}
    assert {sample.class_name for sample in splits.test} == {"c", "d"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"file": "0.png", "label": "a"}], "no path column"),
        ([{"path": "0.png", "label": "a", "split": "validation"}], "use train or test"),
        ([{"path": "", "label": "a"}], "empty path or label"),
    ],
)
def test_csv_invalid_manifest_raises(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "manifest.csv", rows)

    with pytest.raises(DatasetLayoutError, match=message):
        load_dataset("csv", manifest)


def test_csv_missing_image_raises(tmp_path):
    manifest = write_manifest(
        tmp_path / "manifest.csv", [{"path": "missing.png", "label": "a"}, {"path": "missing2.png", "label": "b"}]
    )

    with pytest.raises(DatasetLayoutError, match="missing.png"):
        load_dataset("csv", manifest)


def test_cub_official_class_split(tmp_path):
    root = tmp_path / "CUB_200_2011"
    class_ids = [1, 2, 100, 101, 150, 200]
    image_lines, label_lines, class_lines = [], [], []
    for image_id, class_id in enumerate([cid for cid in class_ids for _ in range(2)], start=1):
        relative = f"{class_id:03d}.Bird_{class_id}/img_{image_id}.jpg"
        write_image(root / "images" / relative)
        image_lines.append(f"{image_id} {relative}")
        label_lines.append(f"{image_id} {class_id}")
    for class_id in class_ids:
        class_lines.append(f"{class_id} {class_id:03d}.Bird_{class_id}")
    (root / "images.txt").write_text("\n".join(image_lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(label_lines) + "\n")
    (root / "classes.txt").write_text("\n".join(class_lines) + "\n")

    splits = load_dataset("cub", tmp_path, val_fraction=0.0)  # the parent folder is accepted too

    assert {sample.class_name for sample in splits.train} == {"001.Bird_1", "002.Bird_2", "100.Bird_100"}
    assert {sample.class_name for sample in splits.test} == {"101.Bird_101", "150.Bird_150", "200.Bird_200"}
    assert all(sample.path.is_file() for sample in [*splits.train, *splits.test])


def test_cub_missing_annotations_raise(tmp_path):
    with pytest.raises(DatasetLayoutError, match="images.txt"):
        load_dataset("cub", tmp_path)


def test_cars_reads_annotations_mat(tmp_path):
    annotations = np.zeros(6, dtype=[("relative_im_path", object), ("class", object), ("test", object)])
    for index, class_id in enumerate([1, 1, 98, 99, 196, 196]):
        relative = f"car_ims/{index:06d}.jpg"
        write_image(tmp_path / relative)
        annotations[index] = (relative, np.uint8(class_id), np.uint8(index % 2))
    class_names = np.empty(196, dtype=object)
    class_names[:] = [f"Make Model {class_id}" for class_id in range(1, 197)]
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations.reshape(1, -1), "class_names": class_names.reshape(1, -1)})

    splits = load_dataset("cars", tmp_path, val_fraction=0.0)

    assert {sample.class_name for sample in splits.train} == {"Make Model 1", "Make Model 98"}
    assert {sample.class_name for sample in splits.test} == {"Make Model 99", "Make Model 196"}
    assert splits.train[0].path == tmp_path / "car_ims" / "000000.jpg"
    check_labels(splits)


def write_ebay(path: Path, rows: list[tuple[int, int, str]]) -> None:
    lines = ["image_id class_id super_class_id path"]
    for image_id, (class_id, super_class, relative) in enumerate(rows, start=1):
        write_image(path.parent / relative)
        lines.append(f"{image_id} {class_id} {super_class} {relative}")
    path.write_text("\n".join(lines) + "\n")


def test_sop_reads_ebay_lists(tmp_path):
    write_ebay(tmp_path / "Ebay_train.txt", [(1, 1, "bicycle_final/1_0.JPG"), (1, 1, "bicycle_final/1_1.JPG"), (2, 2, "chair_final/2_0.JPG")])
    write_ebay(tmp_path / "Ebay_test.txt", [(11319, 1, "bicycle_final/3_0.JPG"), (11319, 1, "bicycle_final/3_1.JPG")])

    splits = load_dataset("sop", tmp_path, val_fraction=0.0)

    assert [sample.class_name for sample in splits.train] == ["1", "1", "2"]
    assert [sample.class_name for sample in splits.test] == ["11319", "11319"]
    check_labels(splits)


def test_sop_invalid_header_raises(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("1 1 1 a.JPG\n")
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")

    with pytest.raises(DatasetLayoutError, match="header"):
        load_dataset("sop", tmp_path)


def test_inshop_train_query_gallery(tmp_path):
    rows = [
        ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train"),
        ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train"),
        ("img/MEN/Denim/id_00000002/01_1_front.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000003/01_1_front.jpg", "id_00000003", "query"),
        ("img/MEN/Denim/id_00000003/01_2_side.jpg", "id_00000003", "gallery"),
        ("img/MEN/Denim/id_00000004/01_1_front.jpg", "id_00000004", "gallery"),
    ]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for relative, item_id, status in rows:
        write_image(tmp_path / relative)
        lines.append(f"{relative}  {item_id}  {status}")
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")

    splits = load_dataset("inshop", tmp_path, val_fraction=0.0)

    assert len(splits.train) == 3
    assert [sample.class_name for sample in splits.query] == ["id_00000003"]
    assert [sample.class_name for sample in splits.gallery] == ["id_00000003", "id_00000004"]
    assert splits.test == [*splits.query, *splits.gallery]
    check_class_disjoint(splits)
    check_labels(splits)


def test_unknown_kind_lists_choices(tmp_path):
    with pytest.raises(DatasetLayoutError, match="choose one of"):
        load_dataset("imagenet", tmp_path)


def test_val_classes_come_from_train_classes():
    train_items = [(Path(f"{name}_{index}.png"), name) for name in "abcdefghij" for index in range(3)]
    test_items = [(Path(f"{name}.png"), name) for name in "xyz"]

    splits = build_splits("test", Path("."), train_items, test_items, val_fraction=0.3, seed=7)

    val_classes = {sample.class_name for sample in splits.val}
    assert len(val_classes) == 3
    assert val_classes <= set("abcdefghij")
    assert len(splits.train) + len(splits.val) == len(train_items)
    check_class_disjoint(splits)
    check_labels(splits)


def test_val_draw_depends_only_on_seed():
    classes = [f"c{index}" for index in range(50)]

    first = choose_val_classes(classes, 0.2, seed=1)
    again = choose_val_classes(list(reversed(classes)), 0.2, seed=1)
    other = choose_val_classes(classes, 0.2, seed=2)

    assert first == again
    assert first != other
    assert len(first) == 10


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range_raises(fraction):
    with pytest.raises(DatasetLayoutError, match="val_fraction"):
        choose_val_classes(["a", "b", "c"], fraction, seed=0)


def test_val_fraction_leaving_no_train_class_raises():
    with pytest.raises(DatasetLayoutError, match="no class to train on"):
        choose_val_classes(["a"], 0.5, seed=0)


def test_split_in_half_gives_odd_class_to_train():
    train, test = split_classes_in_half(["c", "a", "b"])

    assert train == ["a", "b"]
    assert test == ["c"]
