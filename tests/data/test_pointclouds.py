"""Loaders of point-cloud files: DeepSets HDF5, PointNet HDF5 shards, raw ModelNet .off trees, arrays."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from settransformer.data import modelnet_off
from settransformer.data.modelnet_off import load_modelnet_off, read_off
from settransformer.data.pointclouds import (
    load_array,
    load_deepsets_h5,
    load_pointnet_h5,
    split_stratified,
)
from settransformer.tasks.runs import data_changes, record_data

RNG = np.random.default_rng(0)


def _write_h5(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return path


def _deepsets_file(
    path: Path, label_key: str = "tr_labels", n: int = 50
) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = {
        "tr_cloud": RNG.normal(size=(6, n, 3)).astype(np.float32),
        label_key: np.array([0, 1, 2, 0, 1, 2]),
        "test_cloud": RNG.normal(size=(3, n, 3)).astype(np.float32),
        label_key.replace("tr_", "test_"): np.array([2, 1, 0]),
    }
    return _write_h5(path, **arrays), arrays


# -- DeepSets HDF5 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("label_key", ["tr_labels", "tr_label"])
def test_deepsets_h5_reads_both_label_spellings(tmp_path: Path, label_key: str) -> None:
    path, arrays = _deepsets_file(tmp_path / "cloud.h5", label_key)
    data = load_deepsets_h5(path)
    np.testing.assert_array_equal(data.train.points, arrays["tr_cloud"])
    np.testing.assert_array_equal(data.test.labels, arrays[label_key.replace("tr_", "test_")])
    assert data.num_classes == 3 and data.dim == 3 and data.train.mask is None
    assert data.train.labels.dtype == np.int64


def test_deepsets_h5_subsamples_every_kth_point_while_reading(tmp_path: Path) -> None:
    path, arrays = _deepsets_file(tmp_path / "cloud.h5")
    data = load_deepsets_h5(path, num_points=10)
    np.testing.assert_array_equal(data.train.points, arrays["tr_cloud"][:, ::5])
    np.testing.assert_array_equal(data.test.points, arrays["test_cloud"][:, ::5])


def test_deepsets_h5_bad_files(tmp_path: Path) -> None:
    _, arrays = _deepsets_file(tmp_path / "ok.h5")
    del arrays["test_labels"]
    _write_h5(tmp_path / "missing.h5", **arrays)
    with pytest.raises(ValueError, match=r"missing\.h5.*'test_labels' or 'test_label'"):
        load_deepsets_h5(tmp_path / "missing.h5")

    _, arrays = _deepsets_file(tmp_path / "ok2.h5")
    arrays["tr_cloud"] = arrays["tr_cloud"][:, :, 0]
    _write_h5(tmp_path / "flat.h5", **arrays)
    with pytest.raises(ValueError, match=r"flat\.h5.*shape \(S, N, D\)"):
        load_deepsets_h5(tmp_path / "flat.h5")

    _, arrays = _deepsets_file(tmp_path / "ok3.h5")
    arrays["test_labels"] = np.array([0, 1, 7])  # a class never seen in training
    _write_h5(tmp_path / "range.h5", **arrays)
    with pytest.raises(ValueError, match=r"range\.h5.*test label 7 is out of range \[0, 3\)"):
        load_deepsets_h5(tmp_path / "range.h5")

    _, arrays = _deepsets_file(tmp_path / "ok4.h5")
    arrays["tr_labels"] = np.array([0, 1])
    _write_h5(tmp_path / "count.h5", **arrays)
    with pytest.raises(ValueError, match=r"count\.h5.*labels of shape \(6,\)"):
        load_deepsets_h5(tmp_path / "count.h5")


def test_truncated_and_missing_h5_name_the_file(tmp_path: Path) -> None:
    path, _ = _deepsets_file(tmp_path / "full.h5")
    raw = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match=r"cut\.h5.*truncated or corrupt"):
        load_deepsets_h5(tmp_path / "cut.h5")
    with pytest.raises(ValueError, match=r"nothere\.h5: file not found"):
        load_deepsets_h5(tmp_path / "nothere.h5")


# -- PointNet HDF5 ----------------------------------------------------------------------------------
def _pointnet_folder(root: Path, listing: bool = True, num_names: int = 4) -> tuple[Path, list[np.ndarray]]:
    folder = root / "modelnet40_ply_hdf5_2048"
    folder.mkdir()
    clouds = []
    for name, size in [("ply_data_train0.h5", 5), ("ply_data_train1.h5", 3), ("ply_data_test0.h5", 4)]:
        data = RNG.normal(size=(size, 32, 3)).astype(np.float32)
        label = (np.arange(size) % 4).astype(np.uint8)[:, None]
        _write_h5(folder / name, data=data, label=label, normal=-data, faceId=np.zeros((size, 32), np.int32))
        clouds.append(data)
    if listing:
        prefix = "data/modelnet40_ply_hdf5_2048/"
        (folder / "train_files.txt").write_text(f"{prefix}ply_data_train0.h5\n{prefix}ply_data_train1.h5\n")
        (folder / "test_files.txt").write_text(f"{prefix}ply_data_test0.h5\n")
    (folder / "shape_names.txt").write_text("".join(f"shape{i}\n" for i in range(num_names)))
    return folder, clouds


@pytest.mark.parametrize("listing", [True, False])
def test_pointnet_h5_concatenates_listed_shards(tmp_path: Path, listing: bool) -> None:
    folder, clouds = _pointnet_folder(tmp_path, listing)
    data = load_pointnet_h5(folder)
    np.testing.assert_array_equal(data.train.points, np.concatenate(clouds[:2]))
    np.testing.assert_array_equal(data.test.points, clouds[2])
    np.testing.assert_array_equal(data.train.labels, [0, 1, 2, 3, 0, 0, 1, 2])
    assert data.class_names == ["shape0", "shape1", "shape2", "shape3"]
    with_normals = load_pointnet_h5(folder, num_points=16, with_normals=True)
    assert with_normals.dim == 6
    np.testing.assert_array_equal(with_normals.test.points[..., 3:], -clouds[2][:, ::2])


def test_pointnet_h5_errors(tmp_path: Path) -> None:
    folder, _ = _pointnet_folder(tmp_path, num_names=2)  # labels go up to 3
    with pytest.raises(ValueError, match=r"ply_data_train0\.h5.*label 2 is out of range.*\[0, 2\)"):
        load_pointnet_h5(folder)
    (folder / "shape_names.txt").unlink()
    (folder / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test9.h5\n")
    with pytest.raises(ValueError, match=r"test_files\.txt.*ply_data_test9\.h5 not found"):
        load_pointnet_h5(folder)
    with pytest.raises(ValueError, match="not a directory"):
        load_pointnet_h5(tmp_path / "nope")


# -- arrays ---------------------------------------------------------------------------------------
def test_array_npz_with_splits_and_mask(tmp_path: Path) -> None:
    x = RNG.normal(size=(4, 5, 2)).astype(np.float32)
    mask = np.ones((4, 5), bool)
    mask[1, 3:] = False
    np.savez(tmp_path / "a.npz", train_points=x, train_labels=[0, 1, 1, 0], train_mask=mask,
             test_points=x[:2], test_labels=[1, 0], class_names=np.array(["a", "b"]))  # fmt: skip
    data = load_array(tmp_path / "a.npz")
    assert data.class_names == ["a", "b"] and data.dim == 2
    np.savez(tmp_path / "b.npz", points=x, labels=[0, 1, 1, 0], class_names=np.array([b"chair", b"lamp"]))
    assert load_array(tmp_path / "b.npz").class_names == ["chair", "lamp"]  # bytes decoded
    assert data.train.mask is not None and data.test.mask is None
    assert np.all(data.train.points[1, 3:] == 0)  # padding is zeroed whatever the file held


def test_array_single_split_is_stratified_and_disjoint(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(3), 10)
    x = np.arange(30, dtype=np.float32)[:, None, None] * np.ones((1, 4, 3), np.float32)
    np.savez(tmp_path / "b.npz", points=x, labels=labels)
    data = load_array(tmp_path / "b.npz", test_fraction=0.2, seed=1)
    ids_train, ids_test = set(data.train.points[:, 0, 0]), set(data.test.points[:, 0, 0])
    assert not ids_train & ids_test and len(ids_train | ids_test) == 30
    assert np.bincount(data.test.labels).tolist() == [2, 2, 2]
    tr, te = split_stratified(labels, 0.2, 1)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(30))


def test_array_npy_needs_labels(tmp_path: Path) -> None:
    np.save(tmp_path / "p.npy", RNG.normal(size=(10, 4, 3)))
    np.save(tmp_path / "l.npy", np.arange(10) % 2)
    data = load_array(tmp_path / "p.npy", labels_path=tmp_path / "l.npy")
    assert len(data.train) + len(data.test) == 10
    with pytest.raises(ValueError, match=r"p\.npy.*labels_path"):
        load_array(tmp_path / "p.npy")


def test_array_bad_files(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([np.zeros(3), np.zeros(4)], dtype=object), allow_pickle=True)
    np.save(tmp_path / "l.npy", np.arange(2))
    with pytest.raises(ValueError, match=r"obj\.npy.*object array"):
        load_array(tmp_path / "obj.npy", labels_path=tmp_path / "l.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read"):
        load_array(tmp_path / "junk.npz")
    np.savez(tmp_path / "keys.npz", xs=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"keys\.npz: expected keys.*found \['xs'\]"):
        load_array(tmp_path / "keys.npz")
    np.savez(tmp_path / "neg.npz", points=np.zeros((4, 3, 3)), labels=[0, -1, 0, 1])
    with pytest.raises(ValueError, match=r"neg\.npz.*label -1 is out of range"):
        load_array(tmp_path / "neg.npz")
    np.savez(tmp_path / "frac.npz", points=np.zeros((2, 3, 3)), labels=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"frac\.npz.*integer class labels"):
        load_array(tmp_path / "frac.npz")
    np.savez(tmp_path / "nan.npz", points=np.full((2, 3, 3), np.nan), labels=[0, 1])
    with pytest.raises(ValueError, match=r"nan\.npz.*NaN"):
        load_array(tmp_path / "nan.npz")
    with pytest.raises(ValueError, match=r"c\.csv: expected a \.npz or \.npy"):
        (tmp_path / "c.csv").write_text("1,2")
        load_array(tmp_path / "c.csv")


# -- raw ModelNet .off ----------------------------------------------------------------------------
CUBE_V = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
CUBE_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1),
          (2, 3, 7), (2, 7, 6), (0, 2, 6), (0, 6, 4), (1, 5, 7), (1, 7, 3)]  # fmt: skip


def _off(glued: bool, scale: float = 1.0) -> str:
    counts = f"{len(CUBE_V)} {len(CUBE_F)} 0"
    head = f"OFF{counts}\n" if glued else f"OFF\n{counts}\n"
    verts = "".join(f"{x * scale} {y * scale} {z * scale}\n" for x, y, z in CUBE_V)
    return head + verts + "".join(f"3 {a} {b} {c}\n" for a, b, c in CUBE_F)


def _modelnet_tree(root: Path) -> Path:
    for cls in ("box", "crate"):
        for split, count in (("train", 2), ("test", 1)):
            (root / cls / split).mkdir(parents=True)
            for i in range(count):
                # odd files have the header glued to the counts line, like some ModelNet40 files
                (root / cls / split / f"{cls}_{i:04d}.off").write_text(_off(glued=i % 2 == 1, scale=2.0))
    return root


def test_read_off_accepts_glued_header(tmp_path: Path) -> None:
    pytest.importorskip("trimesh")
    (tmp_path / "g.off").write_text(_off(glued=True))
    mesh = read_off(tmp_path / "g.off")
    assert mesh.vertices.shape == (8, 3) and mesh.faces.shape == (12, 3)
    assert mesh.area == pytest.approx(24.0)


def test_modelnet_off_samples_surfaces_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_home: Path
) -> None:
    pytest.importorskip("trimesh")
    root = _modelnet_tree(tmp_path / "ModelNet")
    raw = load_modelnet_off(root, points_per_shape=400, normalize=False, progress=False)
    assert raw.class_names == ["box", "crate"] and raw.train.points.shape == (4, 400, 3)
    np.testing.assert_array_equal(raw.train.labels, [0, 0, 1, 1])
    # every point lies on the cube's surface (|x|_inf = 2), faces are hit in proportion to area
    np.testing.assert_allclose(np.abs(raw.train.points).max(-1), 2.0, atol=1e-5)
    on_top = np.isclose(raw.train.points[..., 2], 2.0, atol=1e-5).mean()
    assert 1 / 6 - 0.05 < on_top < 1 / 6 + 0.05
    caches = list(_cache_home.glob("modelnet_off_*.npz"))
    assert len(caches) == 1 and not list(root.rglob("*.npz"))

    def boom(path: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(modelnet_off, "read_off", boom)
    again = load_modelnet_off(root, points_per_shape=400, normalize=False, progress=False)
    np.testing.assert_array_equal(again.train.points, raw.train.points)
    monkeypatch.undo()

    unit = load_modelnet_off(root, points_per_shape=400, cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # other settings, other cache
    np.testing.assert_allclose(np.linalg.norm(unit.test.points, axis=-1).max(1), 1.0, atol=1e-5)


def test_modelnet_off_leaves_its_data_folder_as_it_was(tmp_path: Path, _cache_home: Path) -> None:
    """The point cache goes to the library's cache folder: a run trained on the tree does not find
    its data changed at ``eval`` (the cache was a new file in it). The same tree at another place
    gets its own cache."""
    pytest.importorskip("trimesh")
    root = _modelnet_tree(tmp_path / "ModelNet")
    run = tmp_path / "run"
    run.mkdir()
    options = {"path": str(root)}
    record_data(run, options)
    first = load_modelnet_off(root, points_per_shape=16, progress=False)
    assert data_changes(run, options) == []
    assert len(list(_cache_home.glob("modelnet_off_*.npz"))) == 1
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved, copy_function=shutil.copy2)
    again = load_modelnet_off(moved, points_per_shape=16, progress=False)
    np.testing.assert_array_equal(again.train.points, first.train.points)
    assert len(list(_cache_home.glob("modelnet_off_*.npz"))) == 2


def test_modelnet_off_bad_mesh_names_the_file(tmp_path: Path) -> None:
    pytest.importorskip("trimesh")
    root = _modelnet_tree(tmp_path / "ModelNet")
    (root / "box" / "test" / "box_0000.off").write_text("OFF\n8 12 0\n1 2 3\n")  # truncated
    with pytest.raises(ValueError, match=r"box_0000\.off: cannot parse as an OFF mesh"):
        load_modelnet_off(root, points_per_shape=16, progress=False)
    with pytest.raises(ValueError, match="no <class>/train"):
        load_modelnet_off(tmp_path, points_per_shape=16, progress=False)


def test_read_off_refuses_a_file_cut_short_in_its_faces(tmp_path: Path) -> None:
    pytest.importorskip("trimesh")
    for glued in (False, True):
        text = _off(glued=glued)
        (tmp_path / "cut.off").write_text("".join(text.splitlines(keepends=True)[:-6]))  # 6 faces of 12
        with pytest.raises(ValueError, match=r"cut\.off: OFF mesh declares 8 vertices and 12 faces"):
            read_off(tmp_path / "cut.off")
        (tmp_path / "whole.off").write_text("# a comment\n" + text)
        assert len(read_off(tmp_path / "whole.off").faces) == 12


def test_modelnet_off_far_from_the_origin_and_edited_in_place(tmp_path: Path) -> None:
    """Meshes are centred in float64 before the cast (a cube 1e5 away gives the cube's cloud), a mesh
    beyond float32's range is refused by name, and a mesh edited in place (same size) is sampled again."""
    pytest.importorskip("trimesh")
    root = _modelnet_tree(tmp_path / "ModelNet")
    mesh = root / "box" / "train" / "box_0000.off"
    near = load_modelnet_off(root, points_per_shape=64, progress=False).train.points
    lines = _off(glued=False, scale=2.0).splitlines()
    shifted = [
        " ".join(str(float(v) + 1e5) for v in ln.split()) if 2 <= i < 10 else ln for i, ln in enumerate(lines)
    ]
    mesh.write_text("\n".join(shifted) + "\n")
    far = load_modelnet_off(root, points_per_shape=64, progress=False).train.points
    np.testing.assert_allclose(far[0], near[0], atol=1e-5)  # the same draws on the same (moved) faces
    mesh.write_text(_off(glued=False, scale=1e39))
    with pytest.raises(ValueError, match=r"box_0000\.off: its sampled points are not finite in float32"):
        load_modelnet_off(root, points_per_shape=16, normalize=False, progress=False)
    same_size = _off(glued=False, scale=2.0)
    mesh.write_text(same_size)
    first = load_modelnet_off(root, points_per_shape=16, normalize=False, progress=False).train.points
    before = mesh.stat()
    mesh.write_text(same_size.replace("\n2.0 2.0 2.0\n", "\n2.0 2.0 9.0\n"))
    assert mesh.stat().st_size == before.st_size
    os.utime(mesh, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    edited = load_modelnet_off(root, points_per_shape=16, normalize=False, progress=False).train.points
    assert edited[0].max() > first[0].max() + 1
