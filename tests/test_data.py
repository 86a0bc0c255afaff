"""Tests of mesa_lib.data and its loaders (cifar_archive, imagefolder) on tiny synthetic archives.

The real archive is never decoded here.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import encode_jpeg, encode_png

from mesa_lib import cifar_archive, imagefolder
from mesa_lib.cifar_archive import load_canonical_archive
from mesa_lib.data import data_fingerprint, load_cifar, split_defender
from mesa_lib.imagefolder import load_image_folder_archive
from mesa_lib.imageset import CifarData, DataError, ImageSet

CIFAR10_CLASSES = [f"c{k}" for k in range(10)]


# --------------------------------------------------------------------------- archive builders


def _write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def _batch(rng: np.random.Generator, n: int, label_key: str, n_classes: int) -> dict:
    return {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, n_classes, size=n).tolist(),
        "batch_label": "synthetic",
    }


def _cifar10_archive(path: Path, n: int = 3) -> dict[str, dict]:
    """Write a tiny cifar-10-python.tar.gz; return the pickled batches by member name."""
    rng = np.random.default_rng(0)
    members = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {m: _batch(rng, n, "labels", 10) for m in members}
    files = {f"cifar-10-batches-py/{m}": pickle.dumps(b, protocol=2) for m, b in batches.items()}
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": n}
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps(meta, protocol=2)
    _write_tar(path, files)
    return batches


def _png(value: int, size: int = 32) -> bytes:
    image = torch.full((3, size, size), value, dtype=torch.uint8)
    image[0, 0, 0] = 255 - value  # a non-constant pixel, so orientation errors would show
    return encode_png(image).numpy().tobytes()


def _folder_files(encode=_png, test_classes: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """Three classes in unsorted order; two train and one test image each; value = 10*k + i."""
    classes = ("zebra", "apple", "mango")
    files = {}
    for k, name in enumerate(classes):
        for i in range(2):
            files[f"train/{name}/{i:04d}.png"] = encode(10 * k + i)
    for k, name in enumerate(test_classes or classes):
        files[f"test/{name}/0000.png"] = encode(100 + k)
    return files


@pytest.fixture
def folder_tar(tmp_path: Path) -> Path:
    return _write_tar(tmp_path / "tiny-images.tar.gz", _folder_files())


# --------------------------------------------------------------------------- canonical format


def test_canonical_cifar10_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    batches = _cifar10_archive(path)
    data = load_canonical_archive(path, "cifar10", expected_md5=None)
    assert data.train.images.shape == (15, 3, 32, 32) and data.test.images.shape == (3, 3, 32, 32)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.classes == tuple(CIFAR10_CLASSES)
    expected = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert np.array_equal(data.train.images.reshape(15, -1).numpy(), expected)
    assert data.test.labels.tolist() == batches["test_batch"]["labels"]
    # row-major CHW: the first 1024 bytes are the red plane
    assert np.array_equal(
        data.test.images[0, 0].flatten().numpy(), batches["test_batch"]["data"][0, :1024]
    )


def test_canonical_md5_mismatch_names_file_and_digests(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    _cifar10_archive(path)
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        load_canonical_archive(path)  # default: the published md5
    assert str(path) in str(err.value) and actual in str(err.value)
    assert cifar_archive.CANONICAL_MD5["cifar10"] in str(err.value)
    assert len(load_canonical_archive(path, expected_md5=actual).train) == 15


def test_canonical_cifar100_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train, test = _batch(rng, 5, "fine_labels", 100), _batch(rng, 2, "fine_labels", 100)
    train["coarse_labels"] = [0] * 5
    names = [f"f{k:02d}" for k in range(100)]
    meta = {"fine_label_names": names, "coarse_label_names": [f"g{k}" for k in range(20)]}
    path = _write_tar(
        tmp_path / "cifar-100-python.tar.gz",
        {
            "cifar-100-python/train": pickle.dumps(train),
            "cifar-100-python/test": pickle.dumps(test),
            "cifar-100-python/meta": pickle.dumps(meta),
        },
    )
    data = load_canonical_archive(path, "cifar100", expected_md5=None)
    assert data.train.classes == tuple(names) and len(data.train) == 5 and len(data.test) == 2
    assert data.train.labels.tolist() == train["fine_labels"]
    assert np.array_equal(data.test.images.reshape(2, -1).numpy(), test["data"])


def test_canonical_refuses_code_in_pickles(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    _cifar10_archive(path)
    with tarfile.open(path) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
    files["cifar-10-batches-py/test_batch"] = pickle.dumps({"data": os.getcwd})
    _write_tar(path, files)
    with pytest.raises(DataError, match="test_batch"):
        load_canonical_archive(path, expected_md5=None)


# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("kind", ["tar.gz", "zip", "directory"])
def test_image_folder_png_exact(tmp_path: Path, kind: str) -> None:
    files = _folder_files()
    if kind == "tar.gz":
        source = _write_tar(tmp_path / "tiny.tar.gz", files)
    elif kind == "zip":
        source = tmp_path / "tiny.zip"
        with zipfile.ZipFile(source, "w") as archive:
            for name, blob in files.items():
                archive.writestr(name, blob)
    else:
        source = tmp_path / "tiny"
        for name, blob in files.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(blob)
    data = load_image_folder_archive(source, expected_classes=3)
    assert data.train.classes == ("apple", "mango", "zebra") == data.test.classes
    assert len(data.train) == 6 and len(data.test) == 3
    # apple was written as class 1 (values 10, 11), mango 2, zebra 0
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.train.images[:, 1, 5, 5].tolist() == [10, 11, 20, 21, 0, 1]
    assert data.train.images[0, 0, 0, 0] == 255 - 10
    assert data.test.images[:, 2, 9, 9].tolist() == [101, 102, 100]


def test_image_folder_jpeg(tmp_path: Path) -> None:
    def jpeg(value: int) -> bytes:
        image = torch.full((3, 32, 32), value, dtype=torch.uint8)
        return encode_jpeg(image, quality=95).numpy().tobytes()

    files = {k.replace(".png", ".jpg"): v for k, v in _folder_files(jpeg).items()}
    data = load_image_folder_archive(_write_tar(tmp_path / "tiny.tgz", files))
    assert data.train.images.shape == (6, 3, 32, 32) and data.train.images.dtype == torch.uint8
    means = data.train.images.float().mean(dim=(1, 2, 3))
    assert torch.allclose(means, torch.tensor([10.0, 11, 20, 21, 0, 1]), atol=2)


def test_cache_created_then_served(
    folder_tar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    first = load_image_folder_archive(folder_tar, cache_dir)
    sha = hashlib.sha256(folder_tar.read_bytes()).hexdigest()
    assert [p.name for p in cache_dir.iterdir()] == [f"imagefolder-{sha}.npz"]

    def no_decode(entries: list) -> list:
        raise AssertionError("decoded although a cache exists")

    monkeypatch.setattr(imagefolder, "_decode_all", no_decode)
    second = load_image_folder_archive(folder_tar, cache_dir)
    assert data_fingerprint(first) == data_fingerprint(second)
    assert second.train.classes == first.train.classes


def test_corrupt_cache_is_rebuilt(folder_tar: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    reference = data_fingerprint(load_image_folder_archive(folder_tar, cache_dir))
    (cache_file,) = cache_dir.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:500])
    assert data_fingerprint(load_image_folder_archive(folder_tar, cache_dir)) == reference
    assert data_fingerprint(imagefolder._load_cache(cache_file)) == reference


def test_changed_archive_gets_its_own_cache(folder_tar: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    load_image_folder_archive(folder_tar, cache_dir)
    files = _folder_files()
    files["train/apple/0000.png"] = _png(77)
    _write_tar(folder_tar, files)
    data = load_image_folder_archive(folder_tar, cache_dir)
    assert data.train.images[0, 1, 5, 5] == 77 and len(list(cache_dir.iterdir())) == 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "loader",
    [
        lambda p: load_image_folder_archive(p),
        lambda p: load_canonical_archive(p, expected_md5=None),
        lambda p: load_cifar(p),
    ],
)
def test_missing_file(tmp_path: Path, loader) -> None:
    path = tmp_path / "nothing-here.tar.gz"
    with pytest.raises(DataError, match="nothing-here.tar.gz"):
        loader(path)


def test_truncated_archives(folder_tar: Path, tmp_path: Path) -> None:
    folder_tar.write_bytes(folder_tar.read_bytes()[: folder_tar.stat().st_size // 2])
    with pytest.raises(DataError, match=folder_tar.name):
        load_image_folder_archive(folder_tar, tmp_path / "cache")
    canonical = tmp_path / "cifar-10-python.tar.gz"
    _cifar10_archive(canonical, n=50)
    canonical.write_bytes(canonical.read_bytes()[: canonical.stat().st_size // 2])
    with pytest.raises(DataError, match=canonical.name):
        load_canonical_archive(canonical, expected_md5=None)


def test_wrong_image_size_names_member(tmp_path: Path) -> None:
    files = _folder_files()
    files["train/mango/0001.png"] = _png(3, size=16)
    path = _write_tar(tmp_path / "small.tar.gz", files)
    with pytest.raises(DataError, match="small.tar.gz.*train/mango/0001.png"):
        load_image_folder_archive(path)


def test_undecodable_image_names_member(tmp_path: Path) -> None:
    files = _folder_files()
    files["test/apple/0000.png"] = b"\xff\xd8 not really a jpeg"
    with pytest.raises(DataError, match="test/apple/0000.png"):
        load_image_folder_archive(_write_tar(tmp_path / "bad.tar.gz", files))


def test_mismatched_class_folders(tmp_path: Path) -> None:
    files = _folder_files(test_classes=("zebra", "apple", "kiwi"))
    path = _write_tar(tmp_path / "odd.tar.gz", files)
    with pytest.raises(DataError, match="odd.tar.gz") as err:
        load_image_folder_archive(path)
    assert "mango" in str(err.value) and "kiwi" in str(err.value)


def test_class_count_mismatch(folder_tar: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{folder_tar.name}.*3 class folders, expected 10"):
        load_image_folder_archive(folder_tar, expected_classes=10)
    load_image_folder_archive(folder_tar, tmp_path / "cache")  # warm the cache
    with pytest.raises(DataError, match=folder_tar.name):
        load_cifar(folder_tar, "cifar10", cache_dir=tmp_path / "cache")


def test_canonical_name_must_match(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        load_cifar(tmp_path / "cifar-100-python.tar.gz", "cifar10")


# --------------------------------------------------------------------------- download


def test_download_failure_suggests_local_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(**kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="download.*failed.*pass a local archive"):
        load_cifar(tmp_path / "cifar-10-python.tar.gz")


def test_download_then_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "reference.tar.gz"
    _cifar10_archive(reference)

    def fake_cifar10(root: str, train: bool, download: bool) -> None:
        assert download
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(reference.read_bytes())

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    md5 = hashlib.md5(reference.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar_archive.CANONICAL_MD5, "cifar10", md5)
    data = load_cifar(tmp_path / "downloads" / "cifar-10-python.tar.gz")
    assert len(data.train) == 15 and len(data.test) == 3


# --------------------------------------------------------------------------- split, fingerprint


def _toy_set(n: int = 20) -> ImageSet:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    return ImageSet(images, torch.arange(n) % 2, ("a", "b"))


def test_split_defender_deterministic_disjoint() -> None:
    test = _toy_set()
    defender, held_out = split_defender(test, 16, generator_seed=7)
    again, _ = split_defender(test, 16, generator_seed=7)
    other, _ = split_defender(test, 16, generator_seed=8)
    assert len(defender) == 16 and len(held_out) == 4
    ids = defender.images[:, 0, 0, 0].tolist() + held_out.images[:, 0, 0, 0].tolist()
    assert sorted(ids) == list(range(20))
    assert torch.equal(defender.images, again.images) and not torch.equal(
        defender.images, other.images
    )
    with pytest.raises(DataError):
        split_defender(test, 21, generator_seed=0)


def test_fingerprint_sees_one_pixel() -> None:
    a = CifarData(_toy_set(), _toy_set(4))
    images = a.train.images.clone()
    images[3, 1, 2, 3] += 1
    b = CifarData(ImageSet(images, a.train.labels, a.train.classes), a.test)
    assert data_fingerprint(a) == data_fingerprint(CifarData(_toy_set(), _toy_set(4)))
    assert data_fingerprint(a) != data_fingerprint(b) and len(data_fingerprint(a)) == 64
