"""Dataset readers. Each returns every train and test image of a dataset as uint8 (n, C, H, W) with labels;
sample ids are indices into the train split, stable across pools.

No reader unpickles anything it could not vet: CIFAR's python batches go through an unpickler that only
rebuilds numpy arrays, and the binary CIFAR, IDX (MNIST) and image-folder formats are parsed directly."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fmask.core.errors import FmaskError
from fmask.pool.files import IMAGE_SUFFIXES

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]


@dataclass
class DatasetSource:
    """A dataset's splits: labels up front, images decoded on demand (folders decode only what is used)."""

    name: str
    classes: list[str]
    train_labels: np.ndarray  # (n_train,) int64
    test_labels: np.ndarray  # (n_test,) int64
    load_train: Callable[[np.ndarray], np.ndarray]  # ids -> uint8 (n, C, H, W)
    load_test: Callable[[np.ndarray], np.ndarray]
    default_flip: bool  # horizontal flips preserve the class (not for digits or letters)


def _in_memory(name: str, classes: list[str], train: tuple, test: tuple, flip: bool) -> DatasetSource:
    (x_train, y_train), (x_test, y_test) = train, test
    return DatasetSource(name, classes, y_train.astype(np.int64), y_test.astype(np.int64),
                         lambda ids: x_train[ids], lambda ids: x_test[ids], flip)


def load_digits_source() -> DatasetSource:
    """scikit-learn's bundled 8x8 digits; every fourth image is the test split (fixed, no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (n, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    is_test = np.arange(len(labels)) % 4 == 3
    return _in_memory("digits", MNIST_CLASSES, (images[~is_test], labels[~is_test]),
                      (images[is_test], labels[is_test]), flip=False)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global, so a file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _read_cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FmaskError(f"{path} is not a valid CIFAR-10 batch ({exc}); re-download with --download") from exc
    return data, labels


def _read_cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise FmaskError(f"{path} is not a valid CIFAR-10 binary batch; re-download with --download")
    records = raw.reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), records[:, 0].astype(np.int64)


def load_cifar10_source(root: Path, download: bool) -> DatasetSource:
    """CIFAR-10 from torchvision's layout: ``cifar-10-batches-py`` (python) or ``cifar-10-batches-bin``."""
    py_dir, bin_dir = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    if not py_dir.is_dir() and not bin_dir.is_dir():
        if not download:
            raise FmaskError(f"CIFAR-10 not found under {root} (no cifar-10-batches-py/); add --download or fix --root")
        _torchvision_download("CIFAR10", root)
    if py_dir.is_dir():
        names, reader, dir_ = [f"data_batch_{i}" for i in range(1, 6)], _read_cifar_python_batch, py_dir
        test_name = "test_batch"
    else:
        names, reader, dir_ = [f"data_batch_{i}.bin" for i in range(1, 6)], _read_cifar_binary_batch, bin_dir
        test_name = "test_batch.bin"
    for name in names + [test_name]:
        if not (dir_ / name).is_file():
            raise FmaskError(f"CIFAR-10 file {dir_ / name} is missing; re-download with --download")
    parts = [reader(dir_ / name) for name in names]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return _in_memory("cifar10", CIFAR10_CLASSES, train, reader(dir_ / test_name), flip=True)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        magic = int.from_bytes(data[:4], "big")
        if magic >> 8 != 0x08:  # 0x08: unsigned byte payload
            raise ValueError("not an unsigned-byte IDX file")
        ndim = magic & 0xFF
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, EOFError) as exc:
        raise FmaskError(f"{path} is not a valid IDX file ({exc}); re-download with --download") from exc


def _find_idx(raw: Path, stem: str) -> Path:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FmaskError(f"{raw / stem} is missing; add --download or fix --root")


def load_mnist_like_source(name: str, root: Path, download: bool) -> DatasetSource:
    """MNIST / Fashion-MNIST from torchvision's layout: ``<root>/<MNIST|FashionMNIST>/raw/*-ubyte[.gz]``."""
    folder, tv_name, classes = {"mnist": ("MNIST", "MNIST", MNIST_CLASSES),
                                "fashionmnist": ("FashionMNIST", "FashionMNIST", FASHION_CLASSES)}[name]
    raw = root / folder / "raw"
    if not raw.is_dir():
        if not download:
            raise FmaskError(f"{folder} not found under {root} (no {folder}/raw/); add --download or fix --root")
        _torchvision_download(tv_name, root)
    split = {}
    for prefix, key in (("train", "train"), ("t10k", "test")):
        images = _read_idx(_find_idx(raw, f"{prefix}-images-idx3-ubyte"))[:, None]
        labels = _read_idx(_find_idx(raw, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise FmaskError(f"{raw}: {prefix} images and labels differ in count; re-download with --download")
        split[key] = (np.ascontiguousarray(images), labels)
    return _in_memory(name, classes, split["train"], split["test"], flip=False)


def _torchvision_download(class_name: str, root: Path) -> None:
    import torchvision

    try:
        getattr(torchvision.datasets, class_name)(str(root), train=True, download=True)
        getattr(torchvision.datasets, class_name)(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise FmaskError(f"downloading {class_name} into {root} failed ({exc.__class__.__name__}); "
                         "fetch the files by hand into --root") from exc


def _list_folder_split(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        entries = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if class_dir.is_dir() else []
        files.extend(entries)
        labels.extend([index] * len(entries))
    return files, np.asarray(labels, dtype=np.int64)


def _decode(files: list[Path], ids: np.ndarray) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    images = []
    for i in ids:
        try:
            with Image.open(files[int(i)]) as img:
                images.append(np.asarray(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise FmaskError(f"cannot decode image {files[int(i)]}; remove or replace the file") from exc
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise FmaskError(f"images in the folder have different sizes {sorted(shapes)[:3]}; resize them to one size")
    if not images:
        return np.zeros((0, 3, 1, 1), dtype=np.uint8)
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def load_folder_source(path: Path) -> DatasetSource:
    """An image folder with ``train/<class>/*`` and ``test/<class>/*``; classes sorted by name, files by name."""
    train_dir, test_dir = path / "train", path / "test"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise FmaskError(f"{path} needs train/ and test/ subfolders with one folder per class (a labeled benchmark, "
                         "whose ground truth labels each query); for your own images use `fmask build-pool --images "
                         f"{path}` and label each batch with `fmask label --answers`")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise FmaskError(f"{train_dir} has no class subfolders; put images in train/<class>/")
    train_files, train_labels = _list_folder_split(train_dir, classes)
    test_files, test_labels = _list_folder_split(test_dir, classes)
    if len(train_files) == 0:
        raise FmaskError(f"{train_dir} holds no images; put images in train/<class>/")
    return DatasetSource(f"folder:{path}", classes, train_labels, test_labels,
                         lambda ids: _decode(train_files, ids), lambda ids: _decode(test_files, ids), True)


DATASET_NAMES = ("digits", "cifar10", "fashionmnist", "mnist", "folder:PATH")


def open_dataset(name: str, *, root: Path, download: bool = False) -> DatasetSource:
    if name == "digits":
        return load_digits_source()
    if name == "cifar10":
        return load_cifar10_source(Path(root), download)
    if name in ("mnist", "fashionmnist"):
        return load_mnist_like_source(name, Path(root), download)
    if name.startswith("folder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_dir():
            raise FmaskError(f"dataset folder {path} does not exist; give folder:PATH of an existing directory")
        return load_folder_source(path)
    raise FmaskError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
