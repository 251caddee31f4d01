"""Labelled image collections for the image-set experiments (counting, set anomaly detection).

Three sources, one result ([`ImageData`][settransformer.data.images.ImageData]: ``images (M, C, H, W)``
float32 in ``[0, 1]`` and ``labels``):

- ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; shipped with
  scikit-learn, nothing is downloaded).
- a folder with one subfolder per class (``root/<class>/<image>.png``), read with Pillow (or
  matplotlib's ``imread`` when Pillow is missing), converted to grayscale and optionally resized;
  e.g. Omniglot with its characters as classes.
- an array file: ``.npz`` or ``.h5``/``.hdf5`` with ``images`` ``(M, H, W)`` or ``(M, H, W, C)``
  and ``labels`` ``(M,)`` (class labels: integers or strings) or ``(M, A)`` (0/1 attributes, e.g.
  CelebA's 40 attributes; the set anomaly task uses them as in the paper). Optional
  ``label_names`` names the classes or attributes.

Examples:
    >>> data = load_images("digits")
    >>> data.images.shape, data.num_classes
    ((1797, 1, 8, 8), 10)
    >>> train, test = data.split(0.3, seed=0)

Random draws of images by class or by attributes live in
[`settransformer.data.image_samplers`][settransformer.data.image_samplers].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import hdf5

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageData",
    "load_digits_images",
    "load_image_array",
    "load_image_folder",
    "load_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
SizeArg = int | Sequence[int] | None


@dataclass(frozen=True)
class ImageData:
    """A labelled image collection.

    Attributes:
        images: ``(M, C, H, W)`` float32 in ``[0, 1]``.
        labels: ``(M,)`` int64 class ids ``0..K-1``, or ``(M, A)`` bool attributes.
        names: the ``K`` class names or ``A`` attribute names.
        source: where the images came from (for messages).
    """

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    source: str

    @property
    def has_attributes(self) -> bool:
        """True when ``labels`` are ``(M, A)`` attributes rather than class ids."""
        return self.labels.ndim == 2

    @property
    def num_classes(self) -> int:
        """``K`` (class labels) or ``A`` (attributes)."""
        return len(self.names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray) -> ImageData:
        """The images at ``index`` (class ids and names unchanged)."""
        return ImageData(self.images[index], self.labels[index], self.names, self.source)

    def split(
        self, test_fraction: float, seed: int, by: Literal["images", "classes"] = "images"
    ) -> tuple[ImageData, ImageData]:
        """A fixed, disjoint train/test split.

        ``by="images"``: every class keeps about ``test_fraction`` of its images for testing
        (stratified), so both halves see every class. ``by="classes"``: whole classes go to the
        test half (unseen classes at test time, Omniglot style); class ids are kept, so test ids
        are not contiguous. Attribute labels split by images only.
        """
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction}")
        if by not in ("images", "classes"):
            raise ValueError(f"split: expected 'images' or 'classes', got {by!r}")
        rng = np.random.default_rng(seed)
        if self.has_attributes or by == "images":
            keys = np.zeros(len(self), np.int64) if self.has_attributes else self.labels
            # Rank of each image within its class in a random order: the first share goes to test.
            order = np.lexsort((rng.random(len(self)), keys))
            sorted_keys = keys[order]
            starts = np.searchsorted(sorted_keys, sorted_keys, side="left")
            counts = np.bincount(sorted_keys)[sorted_keys]
            rank = np.arange(len(self)) - starts
            is_test = np.zeros(len(self), bool)
            is_test[order] = rank < np.round(counts * test_fraction)
        else:
            classes = rng.permutation(self.num_classes)
            test_classes = classes[: max(1, round(self.num_classes * test_fraction))]
            is_test = np.isin(self.labels, test_classes)
        if is_test.all() or not is_test.any():
            raise ValueError(f"{self.source}: too few images/classes for a train/test split")
        return self.subset(np.flatnonzero(~is_test)), self.subset(np.flatnonzero(is_test))


def load_images(source: str | Path, image_size: SizeArg = None, class_depth: int = 1) -> ImageData:
    """Load ``"digits"``, a folder of class subfolders, or an ``.npz``/``.h5`` array file.

    Args:
        source: ``"digits"``, a directory, or a file ending in ``.npz``, ``.h5`` or ``.hdf5``.
        image_size: resize every image to ``(H, W)`` (an int means square); ``None`` keeps the
            size (folder images must then all have the same size).
        class_depth: for folders, how many levels down the class folders are (see
            [`load_image_folder`][settransformer.data.images.load_image_folder]).
    """
    if str(source) == "digits":
        data = load_digits_images()
        return data if image_size is None else _with_images(data, resize(data.images, image_size))
    path = Path(source)
    if path.is_dir():
        return load_image_folder(path, image_size, class_depth)
    if path.suffix.lower() in (".npz", ".h5", ".hdf5"):
        return load_image_array(path, image_size)
    if not path.exists():
        raise ValueError(f"data: {str(source)!r} is not 'digits' and no such file or folder exists")
    raise ValueError(f"data: {path}: expected 'digits', a folder of class subfolders, or a .npz/.h5 file")


def load_digits_images() -> ImageData:
    """scikit-learn's handwritten digits: ``(1797, 1, 8, 8)`` in ``[0, 1]``, 10 classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return ImageData(images, digits.target.astype(np.int64), tuple(map(str, range(10))), "digits")


def load_image_folder(root: str | Path, image_size: SizeArg = None, class_depth: int = 1) -> ImageData:
    """Images in class folders below ``root``, as grayscale ``(M, 1, H, W)``.

    ``class_depth=1``: ``root/<class>/...``; ``class_depth=2``: ``root/<group>/<class>/...``, e.g.
    Omniglot's ``images_background/<alphabet>/<character>/*.png`` with characters as classes
    (named ``"alphabet/character"``). Images may sit at any depth below their class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data: {root} is not a folder")
    if not isinstance(class_depth, int) or class_depth < 1:
        raise ValueError(f"class_depth: expected a positive integer, got {class_depth!r}")
    class_dirs = sorted(
        p
        for p in root.glob("/".join(["*"] * class_depth))
        if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    files: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for class_dir in class_dirs:
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if found:
            files += found
            labels += [len(names)] * len(found)
            names.append(class_dir.relative_to(root).as_posix())
    if not files:
        raise ValueError(
            f"data: {root}: no images found; expected class folders {class_depth} level(s) down holding "
            f"{'/'.join(IMAGE_SUFFIXES)} files"
        )
    size = None if image_size is None else _size_pair(image_size)
    arrays = [_read_gray(f, size) for f in files]
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:
        (h0, w0), (h1, w1) = arrays[0].shape, arrays[odd].shape
        raise ValueError(
            f"data: {root}: images differ in size ({files[0]} is {h0}x{w0}, {files[odd]} is {h1}x{w1}); "
            "pass an image size to resize them"
        )
    images = np.stack(arrays)[:, None]
    return ImageData(images, np.asarray(labels, np.int64), tuple(names), str(root))


def load_image_array(path: str | Path, image_size: SizeArg = None) -> ImageData:
    """Images and labels from ``.npz`` (``allow_pickle=False``) or ``.h5``; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = list(f.keys())
                arrays = {k: np.asarray(f[k]) for k in ("images", "labels", "label_names") if k in keys}
        except ValueError as err:  # object arrays need pickle, which is refused
            raise ValueError(f"data: {path}: cannot read without pickle ({err})") from None
    elif suffix in (".h5", ".hdf5"):
        with hdf5.open_file(path) as f:
            keys = list(f.keys())
            arrays = {k: hdf5.read(f, path, k) for k in ("images", "labels", "label_names") if k in keys}
    else:
        raise ValueError(f"data: {path}: expected a .npz, .h5 or .hdf5 file")
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise ValueError(
            f"data: {path}: missing key(s) {missing}; found {keys}; expected 'images' and 'labels'"
        )
    images = _images_to_nchw(arrays["images"], path)
    labels, names = _labels(arrays["labels"], len(images), path)
    if "label_names" in arrays:
        names = _apply_label_names(arrays["label_names"], labels, names, arrays["labels"].dtype, path)
    data = ImageData(images, labels, names, str(path))
    return data if image_size is None else _with_images(data, resize(data.images, image_size))


def resize(images: np.ndarray, image_size: SizeArg) -> np.ndarray:
    """Resize ``(M, C, H, W)`` images to ``image_size`` (bilinear, antialiased); values stay in [0, 1]."""
    h, w = _size_pair(image_size)
    if images.shape[2:] == (h, w):
        return images
    out = [
        F.interpolate(torch.from_numpy(chunk), size=(h, w), mode="bilinear", antialias=True).numpy()
        for chunk in np.array_split(images, max(1, len(images) // 4096))
    ]
    return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def _with_images(data: ImageData, images: np.ndarray) -> ImageData:
    return ImageData(images, data.labels, data.names, data.source)


def _size_pair(image_size: SizeArg) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size or ())
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size: expected a positive int or [height, width], got {image_size!r}")
    return int(size[0]), int(size[1])


def _read_gray(file: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image file as a ``(H, W)`` float32 grayscale array in ``[0, 1]``."""
    Image = _pillow()
    if Image is None:
        return _read_gray_matplotlib(file, size)
    try:
        with Image.open(file) as img:
            gray = img.convert("L")
            if size is not None:
                gray = gray.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(gray, np.float32) / 255.0
    except OSError as err:
        raise ValueError(f"data: cannot read image {file}: {err}") from None


def _pillow() -> Any:
    """Pillow's ``Image`` module, or ``None`` when Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def _read_gray_matplotlib(file: Path, size: tuple[int, int] | None) -> np.ndarray:
    import matplotlib.image as mpimg

    try:
        img = np.asarray(mpimg.imread(file))
    except (OSError, ValueError) as err:
        hint = "install Pillow for non-PNG files"
        raise ValueError(f"data: cannot read image {file} ({hint}): {err}") from None
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    if img.ndim == 3:  # RGB(A): luminance of the colour channels, as Pillow's "L"
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    if size is not None:
        img = resize(img[None, None], size)[0, 0]
    return img


def _images_to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim not in (3, 4) or images.shape[0] == 0:
        raise ValueError(
            f"data: {path}: 'images' must have shape (M, H, W) or (M, H, W, C), got {images.shape}"
        )
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == bool):
        raise ValueError(f"data: {path}: 'images' must be numeric, got dtype {images.dtype}")
    integer = np.issubdtype(images.dtype, np.integer)
    lo, hi = float(images.min()), float(images.max())
    images = images.astype(np.float32)
    if integer and lo >= 0 and hi <= 255:
        images /= 255.0 if hi > 1 else 1.0  # 8-bit pixels (of any integer dtype), or 0/1 binary images
    elif lo < 0.0 or hi > 1.0:  # e.g. 16-bit pixels, floats in [0, 255]: rescale rather than clip
        images = (images - lo) / max(hi - lo, 1e-12)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def _labels(raw: np.ndarray, m: int, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class ids ``(M,)`` with their names, or bool attributes ``(M, A)`` named ``a0, a1...``."""
    if raw.ndim == 2 and raw.shape[1] == 1:  # (M, 1): class labels, as PointNet's files store them
        raw = raw[:, 0]
    if raw.ndim == 2 and raw.shape[0] == m and raw.shape[1] >= 1:
        if not np.isin(raw, (0, 1, -1)).all():  # CelebA's raw files use -1 for "no"
            raise ValueError(f"data: {path}: 2-D 'labels' are attributes and must hold 0/1 (or -1/1)")
        return raw > 0, tuple(f"a{i}" for i in range(raw.shape[1]))
    if raw.ndim != 1 or raw.shape[0] != m:
        raise ValueError(
            f"data: {path}: 'labels' must have shape ({m},) (one class per image) or ({m}, A) "
            f"(attributes), got {raw.shape}"
        )
    if raw.dtype.kind == "f" and not np.all(raw == np.round(raw)):
        raise ValueError(f"data: {path}: 'labels' must be integer class ids or strings, got fractions")
    values, ids = np.unique(raw, return_inverse=True)
    return ids.astype(np.int64).reshape(m), tuple(_text(v) for v in values)


def _apply_label_names(
    given: np.ndarray, labels: np.ndarray, names: tuple[str, ...], dtype: np.dtype, path: Path
) -> tuple[str, ...]:
    """Attribute names, or names for integer class labels (label ``v`` is ``label_names[v]``)."""
    given_names = [_text(n) for n in np.asarray(given).ravel()]
    if labels.ndim == 2:
        if len(given_names) != labels.shape[1]:
            raise ValueError(f"data: {path}: {len(given_names)} label_names for {labels.shape[1]} attributes")
        return tuple(given_names)
    if not np.issubdtype(dtype, np.integer):
        return names  # string labels name themselves
    values = [int(n) for n in names]
    if min(values) < 0 or max(values) >= len(given_names):
        raise ValueError(
            f"data: {path}: labels go up to {max(values)} but there are {len(given_names)} label_names"
        )
    return tuple(given_names[v] for v in values)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
