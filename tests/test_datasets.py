"""Dataset readers on real on-disk formats written here (no network), and the shared CIFAR-10 folder."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from fmask import load_pool
from tests.conftest import SHARED_CIFAR10, invoke, snapshot


def write_cifar10_python(root, per_batch: int = 20, n_test: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's cifar-10-batches-py layout: pickled dicts with 'data' (n, 3072) uint8 and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n) % 10]
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]},
                        handle, protocol=2)
        if name != "test_batch":
            all_data.append(data)
            all_labels.extend(labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": ["airplane"] * 10, "num_cases_per_batch": per_batch}, handle, protocol=2)
    return np.concatenate(all_data).reshape(-1, 3, 32, 32), np.asarray(all_labels)


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_cifar10_python_batches(tmp_path):
    images, labels = write_cifar10_python(tmp_path / "data")
    result = invoke("build-pool", "--dataset", "cifar10", "--root", tmp_path / "data", "--class-counts",
                    "5,5,5,5,5,5,5,5,5,10", "--initial", "4", "--out", tmp_path / "pool")
    assert result.exit_code == 0, result.output
    pool = load_pool(tmp_path / "pool")
    assert pool.image_shape == (3, 32, 32) and pool.num_classes == 10 and len(pool.ids) == 55
    assert (pool.images(pool.ids).numpy() == images[pool.ids]).all()  # sample id = train-split index
    assert (pool.labels(pool.ids).numpy() == labels[pool.ids]).all()
    assert len(pool.test_labels) == 30


def test_cifar10_binary_batches(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(20, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(20) % 10
        records.tofile(folder / name)
    result = invoke("build-pool", "--dataset", "cifar10", "--root", tmp_path / "data", "--setting", "setting1",
                    "--initial", "2", "--out", tmp_path / "pool")
    assert result.exit_code == 2 and "class 0" in result.output  # 10 per class < 250: refused, nothing written
    assert not (tmp_path / "pool").exists()
    result = invoke("build-pool", "--dataset", "cifar10", "--root", tmp_path / "data", "--class-counts", "10,10,10,10",
                    "--initial", "2", "--out", tmp_path / "pool")
    assert result.exit_code == 0, result.output
    assert load_pool(tmp_path / "pool").num_classes == 4


def test_a_pickle_payload_in_a_cifar_batch_never_runs(tmp_path):
    write_cifar10_python(tmp_path / "data")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump({"data": Payload(), "labels": [0]}, handle, protocol=2)
    result = invoke("build-pool", "--dataset", "cifar10", "--root", tmp_path / "data", "--out", tmp_path / "pool")
    assert result.exit_code == 2 and "data_batch_1" in result.output
    assert not marker.exists() and not (tmp_path / "pool").exists()


@pytest.mark.parametrize("name,folder", [("fashionmnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_mnist_family_idx_files(tmp_path, name, folder):
    raw = tmp_path / "data" / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte.gz", train)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(60) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    result = invoke("build-pool", "--dataset", name, "--root", tmp_path / "data", "--initial", "5",
                    "--out", tmp_path / "pool")
    assert result.exit_code == 0, result.output
    pool = load_pool(tmp_path / "pool")
    assert pool.image_shape == (1, 28, 28) and len(pool.ids) == 60
    assert (pool.images([7]).numpy()[0, 0] == train[7]).all()
    assert pool.manifest["augment"]["flip"] is False  # digits and clothes are not flip-invariant by default


def test_missing_torchvision_dataset_without_download_is_refused(tmp_path):
    before = snapshot(tmp_path)
    result = invoke("build-pool", "--dataset", "fashionmnist", "--root", tmp_path / "nothing", "--out", tmp_path / "p")
    assert result.exit_code == 2 and "--download" in result.output
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/datasets/cifar10 is absent (a user's clone)")
@pytest.mark.slow
def test_folder_loader_reads_shared_cifar10(tmp_path):
    result = invoke("build-pool", "--dataset", f"folder:{SHARED_CIFAR10}", "--setting", "setting2", "--initial", "0",
                    "--class-counts", "3,3,3,3,3,3,3,3,3,6", "--test-per-class", "2", "--out", tmp_path / "pool")
    assert result.exit_code == 0, result.output
    pool = load_pool(tmp_path / "pool")
    assert pool.classes == sorted(p.name for p in (SHARED_CIFAR10 / "train").iterdir())
    assert pool.image_shape == (3, 32, 32) and len(pool.ids) == 33 and len(pool.test_labels) == 20
    assert pool.labels(pool.ids).bincount().tolist() == [3] * 9 + [6]
    # Sample ids index the sorted file list: id 5000 is the first file of the second class.
    from fmask.pool.datasets import load_folder_source

    source = load_folder_source(SHARED_CIFAR10)
    assert len(source.train_labels) == 50000 and source.train_labels[5000] == 1
