"""Every accepted on-disk layout is found under the data root, decoded exactly, and bad data is explained."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import CIFAR_NAMES, make_cifar_batches, make_image_folder, make_mnist_idx
from PIL import Image

from lightning_cnn.data import DataError, load_dataset
from lightning_cnn.data import locate as locate_mod


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_layout(tmp_path: Path, gz: bool) -> None:
    data = load_dataset("mnist", make_mnist_idx(tmp_path, n_train=30, n_test=10, gz=gz), download=False)
    assert data.train.images.shape == (30, 1, 28, 28) and data.test.images.shape == (10, 1, 28, 28)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert data.classes == tuple(str(i) for i in range(10))


def test_cifar_batches_layout_keeps_order_and_pixels(tmp_path: Path) -> None:
    import pickle

    make_cifar_batches(tmp_path, per_batch=20, n_test=10)
    data = load_dataset("cifar10", tmp_path, download=False)
    assert data.train.images.shape == (100, 3, 32, 32) and len(data.test) == 10
    first = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(data.train.images[0].flatten(), torch.from_numpy(first["data"][0]))
    assert data.classes == tuple(CIFAR_NAMES)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_folder_layout(tmp_path: Path, suffix: str) -> None:
    root = make_image_folder(tmp_path / "cifar10-export", per_class_train=3, per_class_test=2, suffix=suffix)
    data = load_dataset("cifar10", tmp_path, download=False)  # found below the root without naming it
    assert data.train.images.shape == (30, 3, 32, 32) and data.test.images.shape == (20, 3, 32, 32)
    assert data.classes == tuple(sorted(CIFAR_NAMES))
    assert torch.bincount(data.train.labels).tolist() == [3] * 10
    if suffix == ".png":  # lossless: the decoded pixels are the file's pixels
        png = np.array(Image.open(root / "train" / "bird" / "0001.png"))
        assert torch.equal(data.train.images[2 * 3 + 1], torch.from_numpy(png).permute(2, 0, 1))


def test_grayscale_image_folder_for_mnist(tmp_path: Path) -> None:
    make_image_folder(tmp_path, 2, 1, classes=[str(i) for i in range(10)], size=28, mode="L")
    data = load_dataset("mnist", tmp_path, download=False)
    assert data.train.images.shape == (20, 1, 28, 28)


def test_decoded_cache_is_reused_and_written_outside_the_data_root(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", 2, 1)
    before = sorted(p for p in root.rglob("*"))
    first = load_dataset("cifar10", root, download=False)
    locate_mod._memo.cache_clear()
    cached = list((Path(os.environ["LIGHTNING_CNN_CACHE"]) / "decoded").glob("*.npz"))
    assert len(cached) == 1
    removed = root / "train" / "cat" / "0000.png"
    removed.unlink()  # the cache must notice a changed folder
    second = load_dataset("cifar10", root, download=False)
    assert len(second.train) == len(first.train) - 1
    assert sorted(p for p in root.rglob("*")) == [p for p in before if p != removed]  # nothing written there


def test_data_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mnist_idx(tmp_path)
    monkeypatch.setenv("LIGHTNING_CNN_DATA", str(tmp_path))
    assert len(load_dataset("mnist", None, download=False).train) == 60


def test_download_goes_to_cache_when_data_root_is_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeMNIST:  # stands in for torchvision's downloader: writes the official layout into root
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(Path(root))
            make_mnist_idx(Path(root))

    monkeypatch.setattr("torchvision.datasets.MNIST", FakeMNIST)
    monkeypatch.setattr(locate_mod, "is_writable", lambda path: False)
    data = load_dataset("mnist", tmp_path / "readonly", download=True)
    assert len(data.train) == 60
    assert calls[0] == Path(os.environ["LIGHTNING_CNN_CACHE"]) / "downloads"


def test_missing_data_without_download_names_paths_layouts_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    text = str(err.value)
    assert "download=False" in text and str(tmp_path) in text
    assert "cifar-10-batches-py" in text and "train/<class>" in text and "--data.data_dir" in text


def test_failed_download_is_explained_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(DataError, match=r"downloading into .* failed: OSError.*name resolution"):
        load_dataset("cifar10", tmp_path, download=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


BAD_FOLDERS = {
    "truncated image": (lambda r: _truncate(r / "train" / "cat" / "0001.jpg"), r"Cannot decode image .*cat/0001\.jpg"),
    "not an image": (lambda r: (r / "train" / "dog" / "notes.txt").write_text("x"), r"dog/notes\.txt is not an image"),
    "empty class": (lambda r: [p.unlink() for p in (r / "test" / "frog").iterdir()], r"test/frog is empty"),
    "missing class": (
        lambda r: [p.unlink() for p in (r / "test" / "ship").iterdir()] and (r / "test" / "ship").rmdir(),
        r"class folders .* differ",
    ),
    "wrong size": (
        lambda r: Image.new("RGB", (20, 20)).save(r / "train" / "bird" / "0000.jpg"),
        r"bird/0000\.jpg is 20x20 pixels; this dataset needs 32x32",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_image_folder_is_named(tmp_path: Path, case: str) -> None:
    root = make_image_folder(tmp_path, 2, 2, suffix=".jpg")
    damage, message = BAD_FOLDERS[case]
    damage(root)
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", root, download=False)


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    make_mnist_idx(tmp_path)
    _truncate(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated"):
        load_dataset("mnist", tmp_path, download=False)


def test_corrupt_cifar_batch_is_named(tmp_path: Path) -> None:
    make_cifar_batches(tmp_path)
    _truncate(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match=r"data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False)


def test_real_data_when_present(real_data: Path) -> None:
    root = real_data
    mnist = load_dataset("mnist", root, download=False)
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    cifar = load_dataset("cifar10", root, download=False)
    assert cifar.train.images.shape == (50000, 3, 32, 32) and len(cifar.test) == 10000
    assert torch.bincount(cifar.test.labels).tolist() == [1000] * 10
    assert cifar.classes == tuple(CIFAR_NAMES)


class _Payload:
    """Unpickling this creates a file: what a crafted batch in a downloaded data folder could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_is_refused_without_running_its_code(tmp_path: Path) -> None:
    import pickle

    make_cifar_batches(tmp_path, per_batch=4, n_test=4)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    with pytest.raises(DataError, match=r"Refusing CIFAR-10 batch .*data_batch_3: it refers to (posix|os)\.system"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_mnist_files_that_do_not_belong_together_are_refused_at_setup(tmp_path: Path) -> None:
    from fakedata import write_idx

    root = make_mnist_idx(tmp_path, n_train=30, n_test=10)
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte holds 29 labels but .*train-images.* holds 30"):
        load_dataset("mnist", root, download=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.full(30, 12, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte has 30 labels outside 0..9 \(e.g. 12\)"):
        load_dataset("mnist", root, download=False)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_decode_cache_is_rebuilt_with_one_line(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture
) -> None:
    root = make_image_folder(tmp_path / "cifar10", per_class_train=3, per_class_test=2)
    first = load_dataset("cifar10", root, download=False)
    locate_mod._memo.cache_clear()
    (cache,) = Path(os.environ["LIGHTNING_CNN_CACHE"]).rglob("*.npz")
    raw = bytearray(cache.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF  # one bit-flipped byte in the middle of the pixels
    cache.write_bytes(bytes(raw))
    again = load_dataset("cifar10", root, download=False)
    assert "is damaged" in capsys.readouterr().out
    assert torch.equal(again.train.images, first.train.images)
    locate_mod._memo.cache_clear()
    assert torch.equal(load_dataset("cifar10", root, download=False).train.images, first.train.images)


def test_a_decompression_bomb_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "cifar10", per_class_train=2, per_class_test=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1,024 pixels: over twice the limit
    with pytest.raises(DataError, match=r"Cannot decode image .*0000\.png: .*decompression bomb"):
        load_dataset("cifar10", root, download=False)


def test_an_unwritable_cache_folder_falls_back_once_to_a_per_user_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import tempfile

    monkeypatch.setenv("LIGHTNING_CNN_CACHE", "/proc/version/cache")  # under a file: never writable, even by root
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    root = make_image_folder(tmp_path / "cifar10", per_class_train=2, per_class_test=1)
    load_dataset("cifar10", root, download=False)
    (cache,) = (tmp_path / "tmp").rglob("*.npz")
    written = cache.stat().st_mtime_ns
    locate_mod._memo.cache_clear()
    load_dataset("cifar10", root, download=False)
    assert capsys.readouterr().out.count("cannot be written; caching in") == 1
    assert cache.stat().st_mtime_ns == written  # decoded once, then read back
