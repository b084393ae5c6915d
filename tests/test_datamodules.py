"""What a batch is: shapes, ranges, the exact augmentation, splits, determinism and DDP sharding."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from fakedata import make_cifar_batches, make_image_folder, make_mnist_idx

from lightning_cnn.data import CIFAR10DataModule, MNISTDataModule, SplitCIFAR10DataModule
from lightning_cnn.data.augment import AugmentParams, flip_and_crop
from lightning_cnn.data.loader import ResidentBatches
from lightning_cnn.data.sources import Split


def _batches(dm, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [dm.on_after_batch_transfer(b, 0) for b in loader]


def test_mnist_batches_are_normalized_with_half_mean_and_std(tmp_path: Path) -> None:
    dm = MNISTDataModule(make_mnist_idx(tmp_path), batch_size=16, download=False)
    dm.setup("fit")
    x, y = _batches(dm, dm.train_dataloader())[0]
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6 and x.min() < -0.9 and x.max() > 0.9
    raw = dm.train_split.images  # no augmentation on MNIST: every batch is exactly normalized pixels
    assert any(torch.allclose(x[0], raw[i].float() / 127.5 - 1.0, atol=1e-6) for i in range(len(raw)))


def test_cifar_evaluation_is_unaugmented_scaled_pixels(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(make_cifar_batches(tmp_path), batch_size=8, download=False)
    dm.setup("fit")
    xs = torch.cat([x for x, _ in _batches(dm, dm.val_dataloader())])
    torch.testing.assert_close(xs, dm.test_split.images.float() / 255.0)  # validation = test split by default
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)


def test_custom_normalization(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(make_cifar_batches(tmp_path), download=False, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    dm.setup()
    x, _ = _batches(dm, dm.test_dataloader())[0]
    expected = (dm.test_split.images[: len(x)].float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / (
        torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(x, expected)


def test_flip_is_the_exact_mirror() -> None:
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    params = AugmentParams(torch.ones(5, dtype=torch.bool), torch.full((5,), 4), torch.full((5,), 4))
    assert torch.equal(flip_and_crop(images, params, pad=4), images.flip(-1))


@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (8, 8), (0, 8), (3, 6), (4, 4)])
def test_crop_is_an_exact_shift_with_zero_fill(dy: int, dx: int) -> None:
    images = torch.randint(1, 256, (2, 3, 32, 32), dtype=torch.uint8)  # no zeros of its own
    params = AugmentParams(torch.zeros(2, dtype=torch.bool), torch.full((2,), dy), torch.full((2,), dx))
    out = flip_and_crop(images, params, pad=4)
    expected = torch.zeros_like(images)
    sy, sx = 4 - dy, 4 - dx  # content moves down/right by (sy, sx)
    expected[..., max(sy, 0) : 32 + min(sy, 0), max(sx, 0) : 32 + min(sx, 0)] = images[
        ..., max(-sy, 0) : 32 - max(sy, 0), max(-sx, 0) : 32 - max(sx, 0)
    ]
    assert torch.equal(out, expected)


def test_training_augmentation_flips_about_half_and_crops_everywhere(tmp_path: Path) -> None:
    split = Split(torch.randint(1, 256, (4000, 3, 32, 32), dtype=torch.uint8), torch.zeros(4000, dtype=torch.long))
    loader = ResidentBatches(split, 4000, train=True, pad=4, flip_p=0.5)
    _, _, params = next(iter(loader))
    assert 0.45 < params.flip.float().mean() < 0.55
    assert set(params.dy.tolist()) == set(range(9)) and set(params.dx.tolist()) == set(range(9))


class _Seen(L.LightningModule):
    """Keeps the training inputs of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).append(batch[0].clone())
        return self.w * batch[0].mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_last_epochs_can_train_on_the_images_as_they_are(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(make_cifar_batches(tmp_path), batch_size=25, download=False, plain_last_epochs=1)
    model = _Seen()
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(model, dm)  # fmt: skip
    plain = dm.normalize(dm.train_split.images).flatten(1)

    def as_they_are(epoch: int) -> torch.Tensor:  # per image: whether it is one of the training images unchanged
        seen = torch.cat(model.seen[epoch]).flatten(1)
        return (seen[:, None] == plain[None]).all(-1).any(1).float()

    assert as_they_are(2).mean() == 1.0 and len(as_they_are(2)) == len(plain)  # the last epoch: every image
    assert as_they_are(0).mean() < 0.2 and as_they_are(1).mean() < 0.2  # before it: flipped and cropped (~1/18 not)


def _epoch(seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[tuple]:
    split = Split(
        torch.randint(0, 256, (50, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8),
        torch.arange(50),
    )
    loader = ResidentBatches(split, 8, train=True, seed=seed, rank=rank, world_size=world, pad=4, flip_p=0.5)
    loader.sampler.set_epoch(epoch)
    return [(y, flip_and_crop(x, p, 4)) for x, y, p in loader]


def test_determinism_under_a_seed() -> None:
    a, b, other_epoch, other_seed = _epoch(3, 1), _epoch(3, 1), _epoch(3, 2), _epoch(4, 1)
    assert all(torch.equal(ya, yb) and torch.equal(xa, xb) for (ya, xa), (yb, xb) in zip(a, b, strict=True))
    assert not torch.equal(torch.cat([y for y, _ in a]), torch.cat([y for y, _ in other_epoch]))
    assert not torch.equal(torch.cat([y for y, _ in a]), torch.cat([y for y, _ in other_seed]))


def test_ddp_training_shards_match_distributed_sampler_and_are_disjoint() -> None:
    from torch.utils.data import DistributedSampler

    shards = [torch.cat([y for y, _ in _epoch(7, 2, rank, 2)]) for rank in range(2)]
    for rank, shard in enumerate(shards):
        sampler = DistributedSampler(range(50), num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(2)
        assert shard.tolist() == list(sampler)
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(50))


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_evaluation_shards_count_every_sample_once(world: int) -> None:
    split = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    seen = [y for rank in range(world) for _, y in ResidentBatches(split, 3, rank=rank, world_size=world)]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))


def test_seeded_holdout_from_training_set(tmp_path: Path) -> None:
    root = make_mnist_idx(tmp_path, n_train=100)
    dm = MNISTDataModule(root, val_fraction=0.2, seed=5, download=False)
    dm.setup()
    assert len(dm.train_split) == 80 and len(dm.val_split) == 20 and len(dm.test_split) == 20
    again = MNISTDataModule(root, val_fraction=0.2, seed=5, download=False)
    again.setup()
    assert torch.equal(dm.val_split.images, again.val_split.images)
    other = MNISTDataModule(root, val_fraction=0.2, seed=6, download=False)
    other.setup()
    assert not torch.equal(dm.val_split.images, other.val_split.images)


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path, per_class_train=10, per_class_test=3, suffix=".png")


def test_split_phases_are_balanced_disjoint_and_hold_out_the_last_fifth(cifar_folder: Path) -> None:
    phases = []
    for phase in (1, 2):
        dm = SplitCIFAR10DataModule(cifar_folder, phase=phase, download=False)
        dm.setup()
        phases.append(dm)
        classes = range(5) if phase == 1 else range(5, 10)
        for split, per_class in ((dm.train_split, 8), (dm.val_split, 2), (dm.test_split, 3)):
            assert torch.bincount(split.labels, minlength=10)[list(classes)].tolist() == [per_class] * 5
            assert set(split.labels.tolist()) == set(classes)
    one, two = phases
    assert one.num_classes == 5 and two.num_classes == 10  # the assignment's label policy
    assert two.class_names[5:] == ["dog", "frog", "horse", "ship", "truck"]
    flat = lambda s: {tuple(x.flatten().tolist()) for x in s.images}  # noqa: E731
    assert flat(one.train_split).isdisjoint(flat(two.train_split))
    assert flat(one.train_split).isdisjoint(flat(one.val_split))
    # "last 20%" per class: the held-out images are the last two files of each class folder
    full = CIFAR10DataModule(cifar_folder, download=False)
    full.setup()
    cats = full.train_split.images[full.train_split.labels == 3]
    assert torch.equal(one.val_split.images[one.val_split.labels == 3], cats[-2:])


def test_split_remap_labels(cifar_folder: Path) -> None:
    dm = SplitCIFAR10DataModule(cifar_folder, phase=2, phase2_classes=[9, 5, 7], remap_labels=True, download=False)
    dm.setup()
    assert dm.num_classes == 3 and dm.class_names == ["truck", "dog", "horse"]
    assert sorted(set(dm.test_split.labels.tolist())) == [0, 1, 2]
    full = CIFAR10DataModule(cifar_folder, download=False)
    full.setup()
    trucks = full.test_split.images[full.test_split.labels == 9]
    assert torch.equal(dm.test_split.images[dm.test_split.labels == 0], trucks)


BAD_ARGS = [
    (MNISTDataModule, {"batch_size": 0}, "batch_size must be a positive integer"),
    (MNISTDataModule, {"batch_size": -4}, "batch_size must be a positive integer"),
    (MNISTDataModule, {"val_fraction": 1.0}, r"val_fraction must be a share in \(0, 1\)"),
    (CIFAR10DataModule, {"std": (0.0, 1.0, 1.0)}, "std values must be positive"),
    (CIFAR10DataModule, {"mean": (0.1, 0.2)}, "mean needs 1 or 3 values"),
    (CIFAR10DataModule, {"flip_p": 1.5}, r"flip_p is a probability"),
    (CIFAR10DataModule, {"plain_last_epochs": -1}, "plain_last_epochs must be zero or positive"),
    (SplitCIFAR10DataModule, {"phase": 3}, "phase must be 1 or 2"),
    (SplitCIFAR10DataModule, {"phase1_classes": [0, 1, 12]}, r"labels \[12\] that CIFAR-10 does not have"),
    (SplitCIFAR10DataModule, {"phase2_classes": [4, 5]}, r"overlap on \[4\]"),
    (SplitCIFAR10DataModule, {"val_fraction": 0.0}, r"val_fraction must be a share in \(0, 1\)"),
]


@pytest.mark.parametrize(("cls", "kwargs", "message"), BAD_ARGS)
def test_impossible_arguments_are_refused_up_front(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(data_dir="unused", **kwargs)


def test_real_cifar_stream(real_data: Path) -> None:
    dm = CIFAR10DataModule(str(real_data), batch_size=128, download=False)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == 391
    x, _ = dm.on_after_batch_transfer(next(iter(loader)), 0)
    assert x.shape == (128, 3, 32, 32) and x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("module", ["CIFAR10DataModule", "MNISTDataModule", "SplitCIFAR10DataModule"])
def test_any_prefix_of_an_evaluation_set_is_a_fair_sample_in_a_fixed_order(tmp_path: Path, module: str) -> None:
    """limit_val_batches / limit_test_batches measure a mix of classes, and the same images in every run."""
    import lightning_cnn.data as data

    root = make_image_folder(tmp_path / "cifar10", per_class_train=10, per_class_test=4)
    make_mnist_idx(tmp_path, n_train=64, n_test=40)
    first_batches = []
    for seed in (0, 1):
        dm = getattr(data, module)(data_dir=str(tmp_path if module == "MNISTDataModule" else root), eval_batch_size=8,
                                   seed=seed, data_on_device=False)  # fmt: skip
        dm.setup("fit")
        batches = [next(iter(dm.val_dataloader()))[1], next(iter(dm.test_dataloader()))[1]]
        assert all(len(set(labels.tolist())) >= 3 for labels in batches), batches  # not one class
        first_batches.append([b.tolist() for b in batches])
    assert first_batches[0] == first_batches[1]  # a fixed order, whatever the training seed


@pytest.mark.parametrize("planted", ["other user's folder", "folder anyone can write", "link"])
def test_the_cache_fallback_never_reads_a_folder_another_user_could_have_planted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """With the cache unwritable, the fallback lies in the shared temp folder: it must be this user's own."""
    import os

    from lightning_cnn.data import paths

    monkeypatch.setenv("LIGHTNING_CNN_CACHE", "/proc/version/cache")  # under a file: never writable
    monkeypatch.setattr(paths.tempfile, "tempdir", str(tmp_path))  # the shared temp folder, here
    monkeypatch.setattr(paths, "_TOLD", set())  # the once-per-process note, for this test alone
    predictable = tmp_path / f"lightning_cnn-cache-{os.getuid()}"
    if planted == "link":
        (tmp_path / "theirs").mkdir()
        predictable.symlink_to(tmp_path / "theirs")
    else:
        predictable.mkdir()
        (predictable / "cifar10-decoded.npz").write_bytes(b"planted")
        if planted == "other user's folder":
            os.chown(predictable, 65534, 65534)  # as root in CI and here; nobody's folder
        else:
            predictable.chmod(0o777)
    chosen = paths.cache_dir()
    assert chosen != predictable and chosen.resolve() != (tmp_path / "theirs").resolve()
    assert chosen.stat().st_uid == os.getuid() and not chosen.stat().st_mode & 0o077 and not any(chosen.iterdir())


def test_the_cache_fallback_is_created_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from lightning_cnn.data import paths

    monkeypatch.setenv("LIGHTNING_CNN_CACHE", "/proc/version/cache")
    monkeypatch.setattr(paths.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(paths, "_TOLD", set())
    first, second = paths.cache_dir(), paths.cache_dir()
    assert first == second == tmp_path / f"lightning_cnn-cache-{os.getuid()}"
    assert first.stat().st_mode & 0o777 == 0o700
