"""``settransformer.data.images``: digits, image folders, array files, splits and samplers."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from settransformer.data import images
from settransformer.data.images import (
    ImageData,
    load_image_array,
    load_image_folder,
    load_images,
)

PIL = pytest.importorskip("PIL.Image")


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> dict[str, list[np.ndarray]]:
    """PNG files ``root/<class>/<i>.png`` of the given (H, W) sizes; returns the written pixels."""
    rng = np.random.default_rng(0)
    written: dict[str, list[np.ndarray]] = {}
    for name, shapes in sizes.items():
        (root / name).mkdir(parents=True)
        written[name] = []
        for i, (h, w) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
            PIL.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
            written[name].append(pixels)
    return written


def test_digits() -> None:
    data = load_images("digits")
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() == 1.0
    assert np.array_equal(np.unique(data.labels), np.arange(10))
    assert data.num_classes == 10 and not data.has_attributes


def test_folder_reads_classes_and_pixels(tmp_path: Path) -> None:
    written = write_folder(tmp_path, {"beta": [(6, 5)] * 2, "alpha": [(6, 5)] * 3})
    (tmp_path / "alpha" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.names == ("alpha", "beta")  # sorted class folders
    assert data.images.shape == (5, 1, 6, 5)
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_allclose(data.images[3, 0], written["beta"][0] / 255.0, atol=1e-6)


def test_folder_with_omniglot_layout(tmp_path: Path) -> None:
    write_folder(tmp_path / "Greek", {"alpha": [(4, 4)] * 2, "beta": [(4, 4)]})
    write_folder(tmp_path / "Latin", {"a": [(4, 4)] * 3})
    data = load_images(tmp_path, class_depth=2)
    assert data.names == ("Greek/alpha", "Greek/beta", "Latin/a")
    assert data.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert load_images(tmp_path).names == ("Greek", "Latin")  # one level: alphabets as classes
    with pytest.raises(ValueError, match="class_depth"):
        load_images(tmp_path, class_depth=0)


def test_folder_colour_is_converted_to_grayscale_and_resized(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 1] = 200
    PIL.fromarray(rgb, mode="RGB").save(tmp_path / "a" / "x.png")
    data = load_images(tmp_path, image_size=4)
    assert data.images.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(data.images, round(0.587 * 200) / 255.0, atol=2 / 255)


def test_folder_sizes_must_match_without_resize(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": [(6, 6), (7, 6)]})
    with pytest.raises(ValueError, match=r"differ in size.*1\.png"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=(5, 4)).images.shape == (2, 1, 5, 4)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_images(tmp_path)


def test_folder_fallback_to_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_folder(tmp_path, {"a": [(5, 5)], "b": [(5, 5)]})
    expected = load_image_folder(tmp_path).images
    monkeypatch.setattr(images, "_pillow", lambda: None)  # as if Pillow were not installed
    data = load_image_folder(tmp_path)
    np.testing.assert_allclose(data.images, expected, atol=1e-6)
    np.testing.assert_allclose(data.images[1, 0], written["b"][0] / 255.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_array_file_class_labels(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 4, 3, 3), dtype=np.uint8)  # (M, H, W, C)
    labels = np.array([5, 2, 5, 9, 2, 2, 9])
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, images=images, labels=labels)
    else:
        with h5py.File(path, "w") as f:
            f["images"], f["labels"] = images, labels
    data = load_image_array(path)
    assert data.images.shape == (7, 3, 4, 3)  # channels first
    np.testing.assert_allclose(data.images[2], images[2].transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert data.names == ("2", "5", "9")
    assert data.labels.tolist() == [1, 0, 1, 2, 0, 0, 2]


def test_array_file_string_labels_attributes_and_names(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((4, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "s.npz", images=images, labels=np.array(["cat", "dog", "cat", "ant"]))
    data = load_images(tmp_path / "s.npz", image_size=3)
    assert data.names == ("ant", "cat", "dog") and data.labels.tolist() == [1, 2, 1, 0]
    assert data.images.shape == (4, 1, 3, 3)

    attrs = np.array([[1, -1], [1, 1], [-1, -1], [1, 1]])  # CelebA's -1/1 convention
    np.savez(tmp_path / "a.npz", images=images, labels=attrs, label_names=np.array(["Smiling", "Male"]))
    data = load_images(tmp_path / "a.npz")
    assert data.has_attributes and data.names == ("Smiling", "Male")
    assert data.labels.tolist() == [[True, False], [True, True], [False, False], [True, True]]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"imgs": np.zeros((2, 3, 3)), "labels": np.zeros(2)}, r"missing key\(s\) \['images'\].*imgs"),
        ({"images": np.zeros((2, 9)), "labels": np.zeros(2)}, r"'images' must have shape \(M, H, W\)"),
        ({"images": np.zeros((2, 3, 3)), "labels": np.zeros(3)}, r"'labels' must have shape \(2,\)"),
        (
            {"images": np.zeros((2, 3, 3)), "labels": np.array([[0, 2], [1, 0]])},
            "attributes and must hold 0/1",
        ),
        ({"images": np.zeros((2, 3, 3)), "labels": np.array([0.5, 1.0])}, "got fractions"),
    ],
)
def test_array_file_errors_name_the_file(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_images(path)
    assert str(path) in str(info.value)


def test_array_file_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.zeros((2, 3, 3)), labels=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_images(path)


def test_unknown_source() -> None:
    with pytest.raises(ValueError, match="no such file or folder"):
        load_images("/nonexistent/images")


def test_split_is_disjoint_stratified_and_fixed() -> None:
    data = load_images("digits")
    train, test = data.split(0.3, seed=3)
    assert len(train) + len(test) == len(data)
    counts = np.bincount(test.labels, minlength=10) / np.bincount(data.labels)
    assert np.all(np.abs(counts - 0.3) < 0.02)  # every class keeps ~30% for testing
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) <= 5  # digits has a few duplicate images
    again = data.split(0.3, seed=3)[1]
    assert np.array_equal(again.images, test.images)
    assert not np.array_equal(data.split(0.3, seed=4)[1].labels, test.labels)


def test_split_by_classes() -> None:
    data = load_images("digits")
    train, test = data.split(0.3, seed=0, by="classes")
    assert len(set(train.labels) & set(test.labels)) == 0
    assert len(set(test.labels)) == 3


def test_image_data_subset() -> None:
    data = ImageData(np.zeros((3, 1, 2, 2), np.float32), np.array([0, 1, 1]), ("a", "b"), "mem")
    sub = data.subset(np.array([2, 0]))
    assert sub.labels.tolist() == [1, 0] and sub.image_shape == (1, 2, 2) and len(sub) == 2


def test_array_file_pixels_of_other_integer_types_and_labels_of_one_column(tmp_path: Path) -> None:
    """16-bit and signed pixels land in [0, 1] (they were divided by 255), and labels ``(M, 1)`` are
    class labels, as the point-cloud loaders read them (they were one attribute)."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    for dtype, lo, hi in ((np.uint16, 0, 65536), (np.int8, -128, 128), (np.int64, 0, 256)):
        np.savez(
            tmp_path / "i.npz", images=rng.integers(lo, hi, (40, 8, 8)).astype(dtype), labels=labels[:, None]
        )
        data = load_images(tmp_path / "i.npz")
        assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0, dtype
        assert float(data.images.max()) > 0.9
        np.testing.assert_array_equal(data.labels, labels)
