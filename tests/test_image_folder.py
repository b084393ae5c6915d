"""A user's own folder of images: any size and mode, resident or streamed, every bad input in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_cnn.data import DataError, ImageFolderDataModule
from lightning_cnn.data import image_folder as image_folder_module
from lightning_cnn.data.predict import network_pixels

CLASSES = ("cats", "dogs", "owls")


def make_photos(root: Path, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``root/<split>/<class>/*``: images of many sizes, modes and formats; class c has channel c bright."""
    rng = np.random.default_rng(seed)
    formats = [("RGB", "png"), ("L", "jpg"), ("RGBA", "png"), ("P", "gif"), ("RGB", "webp"), ("CMYK", "jpg")]
    for split, n in (per_class or {"train": 10, "test": 3}).items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(16, 80)), int(rng.integers(16, 80))
                pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
                pixels[..., c] = 230
                mode, suffix = formats[i % len(formats)]
                Image.fromarray(pixels).convert(mode).save(folder / f"{i:03d}.{suffix}")
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return make_photos(tmp_path / "photos")


def _module(root: Path, **kwargs: object) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(root), **{"image_size": [24, 40], "batch_size": 8, "num_workers": 0, **kwargs})


def test_any_size_and_mode_becomes_the_network_input_with_a_stratified_validation(
    photos: Path, capsys: pytest.CaptureFixture
) -> None:
    dm = _module(photos)
    assert dm.class_names == list(CLASSES) and dm.input_shape == (3, 24, 40)
    dm.setup()
    assert dm.train_split is not None and dm.val_split is not None and dm.test_split is not None
    assert dm.train_split.images.shape[1:] == (3, 24, 40) and dm.train_split.images.dtype == torch.uint8
    assert len(dm.train_split) + len(dm.val_split) == 30 and len(dm.test_split) == 9
    assert sorted(dm.val_split.labels.tolist()) == [0, 1, 2]  # 10% of each class of 10, seeded
    # the bright channel of each class survives every mode (gray ones excepted: their channels are equal)
    first = dm.test_split.images[:3].float().mean(dim=(2, 3))  # interleaved: one image of each class
    assert first.argmax(dim=1).tolist() == [0, 1, 2]
    mean, std = dm.hparams["mean"], dm.hparams["std"]  # computed from the training images, recorded
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and all(s > 0 for s in std)
    assert "resident in memory" in capsys.readouterr().out


def test_gray_images_at_a_square_size(photos: Path) -> None:
    dm = _module(photos, image_size=28, channels=1)
    dm.setup()
    assert dm.input_shape == (1, 28, 28) and dm.train_split is not None
    assert dm.train_split.images.shape[1:] == (1, 28, 28)


def test_streaming_serves_the_same_images_as_resident(photos: Path, capsys: pytest.CaptureFixture) -> None:
    resident, streaming = _module(photos), _module(photos, memory_budget_gb=0)
    resident.setup()
    streaming.setup()
    assert not resident.streaming and streaming.streaming
    assert "streaming from the files" in capsys.readouterr().out
    for which, split in (("val", resident.val_split), ("test", resident.test_split)):
        assert split is not None
        images = torch.cat([x for x, _ in getattr(streaming, f"{which}_dataloader")()])
        labels = torch.cat([y for _, y in getattr(streaming, f"{which}_dataloader")()])
        assert torch.equal(images, split.images) and torch.equal(labels, split.labels), which
    stats = [resident.hparams["mean"], streaming.hparams["mean"]]  # from all (resident) or a sample (streaming)
    assert np.allclose(*stats, atol=1e-5)  # here the sample is every training image


def test_a_streamed_fit_trains_with_the_augmentation(photos: Path, tmp_path: Path) -> None:
    from lightning_cnn.models import CIFARCNN, ImageClassifier

    dm = _module(photos, memory_budget_gb=0)
    model = ImageClassifier(CIFARCNN(num_classes=3, input_shape=(3, 24, 40)), num_classes=3)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int) -> None:
            seen.append(batch)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[Spy()])  # fmt: skip
    trainer.fit(model, dm)
    trainer.test(model, dm)
    assert len(seen) == 4 and seen[0][0].dtype == torch.float32  # 27 training images, batch 8; normalized
    assert 0.0 <= trainer.callback_metrics["test/acc"] <= 1.0


def test_the_decode_cache_is_used_and_a_changed_image_invalidates_it(
    photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _module(photos).setup()
    calls = []
    real = image_folder_module.load_image
    monkeypatch.setattr(image_folder_module, "load_image", lambda *a: calls.append(a) or real(*a))
    _module(photos).setup()
    assert calls == []  # decoded once: the cache served the second setup
    changed = photos / "train" / "dogs" / "000.png"
    Image.new("RGB", (30, 30), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))
    dm = _module(photos)
    dm.setup()
    assert len(calls) == 39  # the whole folder again: a changed file gives a new fingerprint
    assert dm.train_split is not None and dm.val_split is not None


def test_a_damaged_cache_is_rebuilt_and_the_cifar_readers_cache_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fakedata import make_image_folder

    from lightning_cnn.data.sources import read_image_folder

    root = make_image_folder(tmp_path / "cifar", per_class_train=3, per_class_test=2)
    read_image_folder(root, channels=3, size=32)  # CIFAR10DataModule's reader of the same folder
    first = _module(root, image_size=32)
    first.setup()
    decoded = Path(os.environ["LIGHTNING_CNN_CACHE"]) / "decoded"
    (mine,) = decoded.glob("imagefolder-*.npz")
    assert len(list(decoded.glob("*.npz"))) == 2  # neither reader removed the other's decode
    data = bytearray(mine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mine.write_bytes(bytes(data))
    again = _module(root, image_size=32)
    again.setup()
    assert "is damaged" in capsys.readouterr().out
    assert first.test_split is not None and again.test_split is not None
    assert torch.equal(first.test_split.images, again.test_split.images)


# ---------------------------------------------------------------------------------------------- bad input
def _fails(root: Path, match: str, **kwargs: object) -> str:
    with pytest.raises(DataError, match=match) as info:
        _module(root, **kwargs).setup()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_truncated_image_is_named_or_skipped_and_counted(photos: Path, capsys: pytest.CaptureFixture) -> None:
    bad = photos / "train" / "owls" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    _fails(photos, rf"Cannot decode image {bad}.*data\.skip_bad")
    dm = _module(photos, skip_bad=True)
    dm.setup()
    assert dm.train_split is not None and dm.val_split is not None
    assert len(dm.train_split) + len(dm.val_split) == 29
    assert "1 image(s) that could not be decoded were left out" in capsys.readouterr().out


def test_a_decompression_bomb_is_refused(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6500)  # the others are at most 80x80
    Image.new("RGB", (100, 100)).save(photos / "train" / "cats" / "big.png")  # over it: Pillow only warns
    _fails(photos, r"Cannot decode image .*big\.png.*decompression bomb")


def test_bad_folders_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_photos(tmp_path / "one", {"train": 1})
    _fails(root, r"Class folder .*cats holds 1 image\(s\); each class needs at least 2")
    root = tmp_path / "single"
    make_photos(tmp_path / "tmp", {"train": 3})
    (root / "train").mkdir(parents=True)
    shutil.move(tmp_path / "tmp" / "train" / "cats", root / "train" / "cats")
    _fails(root, r"holds 1 class folder\(s\); a classifier needs at least 2")
    root = make_photos(tmp_path / "differ")
    shutil.rmtree(root / "test" / "owls")
    _fails(root, r"The class folders of .*test \(cats, dogs\) differ from those of .*train \(cats, dogs, owls\)")
    _fails(tmp_path / "nothing", r"nothing/train is not a folder.*--data\.data_dir")


def test_a_symlink_loop_is_refused_and_other_files_are_counted(photos: Path, capsys: pytest.CaptureFixture) -> None:
    (photos / "train" / "cats" / "README.txt").write_text("not an image")
    (photos / "train" / "cats" / ".DS_Store").write_bytes(b"\0")
    dm = _module(photos)
    dm.setup()
    assert "1 non-image file(s) ignored" in capsys.readouterr().out
    (photos / "train" / "dogs" / "again").symlink_to(photos / "train")
    _fails(photos, r"dogs/again is a link back to a folder above it \(a loop\)")


def test_no_test_folder_tests_on_validation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_photos(tmp_path / "photos", {"train": 6, "val": 2})
    dm = _module(root)
    dm.setup()
    assert dm.val_split is not None and dm.test_split is not None
    assert len(dm.val_split) == 6 and torch.equal(dm.test_split.images, dm.val_split.images)
    assert "has no test/ folder; testing on the validation images" in capsys.readouterr().out


def test_a_backbone_for_other_channels_is_refused_in_one_line(tmp_path: Path) -> None:
    from lightning_cnn.errors import CheckpointError
    from lightning_cnn.models import MNISTCNN, TransferNet

    path = tmp_path / "gray.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in MNISTCNN().state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match=r"takes 1-channel images, these have 3 \(data\.channels\)"):
        TransferNet(str(path), num_classes=3, input_shape=(3, 32, 32), base=MNISTCNN())


def test_predict_and_serve_crop_the_centre_as_training_does() -> None:
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # a white square in the middle of a black strip
    assert network_pixels(Image.fromarray(wide), (3, 10, 10)).min() > 200  # squashed, a third would be black


def test_a_schedule_too_short_for_the_run_is_one_line(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """A small folder and one epoch: 4 steps, whose one-cycle warm-up (25%) has none (torch divides by zero)."""
    from lightning_cnn.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "imagefolder", f"--data.data_dir={photos}", "--trainer.max_epochs=1",
              "--data.batch_size=8", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "does not fit a run of 4 optimizer step(s)" in capsys.readouterr().err


EXE = shutil.which("lightning-cnn")


@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_the_command_names_a_bad_image_and_exits_2(photos: Path, tmp_path: Path) -> None:
    assert EXE is not None
    bad = photos / "test" / "dogs" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    fit = [EXE, "fit", "--config", "imagefolder", f"--data.data_dir={photos}", "--trainer.max_epochs=1"]
    done = subprocess.run(fit, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"Cannot decode image {bad}" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(EXE is None, reason="the lightning-cnn executable is not installed")
def test_fit_then_transfer_onto_a_folder_through_the_command(tmp_path: Path) -> None:
    assert EXE is not None
    photos = make_photos(tmp_path / "photos")
    quick = ["--trainer.max_epochs=2", "--data.batch_size=8", "--trainer.enable_progress_bar=false"]
    fit = subprocess.run([EXE, "fit", "--config", "imagefolder", f"--data.data_dir={photos}", *quick],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    run = tmp_path / "runs" / "imagefolder" / "latest"
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    # the backbone onto the same classes at another size, through the run folder
    transfer = subprocess.run([EXE, "fit", "--config", "imagefolder_transfer", f"--data.data_dir={photos}",
                               "--data.image_size=40", f"--model.network.init_args.checkpoint_path={run}", *quick],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert transfer.returncode == 0, transfer.stderr[-2000:]
    assert (tmp_path / "runs" / "imagefolder_transfer" / "latest" / "summary.json").is_file()
