"""Networks, metrics against scikit-learn, and the transfer model's frozen backbone."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cnn.errors import CheckpointError, ConfigError
from lightning_cnn.models import CIFARCNN, MNISTCNN, CIFARCNNDropout, ImageClassifier, TransferNet
from lightning_cnn.models.metrics import classification_metrics, scalar_figures


def test_cifar_cnn_is_the_assignments_architecture() -> None:
    net = CIFARCNN()
    convs = [m for m in net.backbone if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.head if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 64, (3, 3), (0, 0)),
        (64, 128, (3, 3), (0, 0)),
        (128, 256, (3, 3), (0, 0)),
    ]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 128), (128, 256), (256, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.backbone) == 3
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())


@pytest.mark.parametrize("network", [CIFARCNN, MNISTCNN])
def test_backbone_pools_before_relu_yet_computes_the_assignments_conv_relu_pool(network: type[nn.Module]) -> None:
    torch.manual_seed(0)
    net = network(init="he")
    assignment = nn.Sequential(*[
        nn.Sequential(m, nn.ReLU(), nn.MaxPool2d(2)) if isinstance(m, nn.Conv2d) else nn.Identity()
        for m in net.backbone if isinstance(m, nn.Conv2d | nn.Flatten)
    ])  # fmt: skip
    kinds = [type(m).__name__ for m in net.backbone][:3]
    assert kinds == ["Conv2d", "MaxPool2d", "ReLU"]  # the order that saves the work; the same function:
    x = torch.randn(4, 3, 32, 32) if network is CIFARCNN else torch.randn(4, 1, 28, 28)
    ours = net.head(net.backbone(x))
    theirs = net.head(assignment(x).flatten(1))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    grads = [torch.autograd.grad(y.square().sum(), list(net.parameters())) for y in (ours, theirs)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_cnn_puts_dropout_before_each_linear_layer() -> None:
    kinds = [type(m).__name__ for m in CIFARCNNDropout().head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [m.p for m in CIFARCNNDropout().head if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert [m.p for m in CIFARCNNDropout(dropout=(0.5, 0.3, 0.0)).head if isinstance(m, nn.Dropout)] == [0.5, 0.3, 0.0]
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        CIFARCNNDropout(dropout=(0.2, 1.0, 0.1))


@pytest.mark.parametrize("network", [CIFARCNN, CIFARCNNDropout, MNISTCNN])
def test_init_keras_and_he_zero_the_biases_and_he_keeps_the_signal(network: type[nn.Module]) -> None:
    torch.manual_seed(0)
    nets = {init: network(init=init).eval() for init in ("pytorch", "keras", "he")}
    for init in ("keras", "he"):
        layers = [m for m in nets[init].modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        assert layers and all(not m.bias.any() for m in layers)
    x = torch.rand(64, *(3, 32, 32) if network is not MNISTCNN else (1, 28, 28))
    spread = {init: net(x).std(dim=0).mean().item() for init, net in nets.items()}
    # PyTorch's default init shrinks the logits' dependence on the input by orders of magnitude on these nets
    assert spread["he"] > 10 * spread["pytorch"]
    with pytest.raises(ConfigError, match="init must be"):
        network(init="glorot")


def test_mnist_cnn_is_the_assignments_architecture() -> None:
    net = MNISTCNN()
    assert [(m.in_features, m.out_features) for m in net.head if isinstance(m, nn.Linear)] == [(1600, 128), (128, 10)]
    assert [m.out_channels for m in net.backbone if isinstance(m, nn.Conv2d)] == [32, 64]


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _random_predictions(seed: int, n: int = 500, labels: range = range(10)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor(list(labels))[torch.randint(len(labels), (n,), generator=g)]
    noise = torch.randint(0, 10, (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.6, target, noise)  # 60% right, errors anywhere in 0-9
    return preds, target


def _sklearn_figures(preds: torch.Tensor, target: torch.Tensor, stage: str) -> dict[str, float]:
    p, t = preds.numpy(), target.numpy()
    figures = {f"{stage}/acc": skm.accuracy_score(t, p), f"{stage}/error": 1 - skm.accuracy_score(t, p)}
    for average in ("weighted", "macro"):
        figures[f"{stage}/precision_{average}"] = skm.precision_score(t, p, average=average, zero_division=0)
        figures[f"{stage}/recall_{average}"] = skm.recall_score(t, p, average=average, zero_division=0)
        figures[f"{stage}/f1_{average}"] = skm.f1_score(t, p, average=average, zero_division=0)
    per_class = skm.recall_score(t, p, labels=range(10), average=None, zero_division=0)
    for c in sorted(set(t.tolist())):
        figures[f"{stage}/acc_class_{c}"] = per_class[c]
    return figures


@pytest.mark.parametrize("labels", [range(10), range(5, 10)], ids=["cifar10", "phase2-labels-5-9"])
def test_every_figure_equals_scikit_learns(labels: range) -> None:
    preds, target = _random_predictions(0, labels=labels)
    collection = classification_metrics(10, "test")
    for chunk in range(0, len(preds), 64):  # accumulated over batches, as in an epoch
        collection.update(preds[chunk : chunk + 64], target[chunk : chunk + 64])
    support = torch.bincount(target, minlength=10)
    ours = {
        k: float(v) for k, v in scalar_figures(collection.compute(), "test", list(map(str, range(10))), support).items()
    }
    expected = _sklearn_figures(preds, target, "test")
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


class _Fixed(nn.Module):
    """A 'network' whose logits are given: it looks each input's index up in a table."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits)
        self.head = nn.Linear(1, logits.shape[1])  # gives the classifier its class count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_test_stage_logs_scikit_learn_figures_and_confusion_matrix() -> None:
    preds, target = _random_predictions(1, n=300)
    logits = torch.nn.functional.one_hot(preds, 10).float()
    loader = _loader(torch.arange(300).view(-1, 1).float(), target, batch_size=64)
    model = ImageClassifier(_Fixed(logits), num_classes=10)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.test(model, loader, verbose=False)[0]
    for key, value in _sklearn_figures(preds, target, "test").items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    assert torch.equal(model.confusion["test"], torch.from_numpy(skm.confusion_matrix(target, preds, labels=range(10))))
    precision, recall, f1, _ = skm.precision_recall_fscore_support(target, preds, labels=range(10), zero_division=0)
    for name, expected in (("precision", precision), ("recall", recall), ("f1", f1)):  # the run's per_class.csv
        assert model.per_class["test"][name].tolist() == pytest.approx(expected.tolist(), abs=1e-6), name


def _phase1_checkpoint(tmp_path: Path, network: nn.Module | None = None) -> Path:
    model = ImageClassifier(network or CIFARCNN(num_classes=5), num_classes=5)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, _loader(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])))
    path = tmp_path / "phase1.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_transfer_backbone_is_frozen_bit_for_bit_and_the_head_learns(tmp_path: Path) -> None:
    ckpt = _phase1_checkpoint(tmp_path)
    net = TransferNet(str(ckpt), num_classes=10)
    phase1 = torch.load(ckpt, weights_only=True)["state_dict"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert all(torch.equal(before[f"backbone.{k}"], phase1[f"network.backbone.{k}"]) for k in net.backbone.state_dict())
    assert [(m.in_features, m.out_features) for m in net.head if isinstance(m, nn.Linear)] == [(1024, 128), (128, 10)]
    model = ImageClassifier(
        net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)
    )
    data = _loader(torch.randn(24, 3, 32, 32), torch.randint(5, 10, (24,)))
    modes = []

    class Probe(L.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            modes.append((net.backbone.training, net.head.training))

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.callbacks.append(Probe())
    trainer.fit(model, data)
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("backbone."))
    assert not all(torch.equal(after[k], before[k]) for k in before if k.startswith("head."))
    assert set(modes) == {(False, True)}  # frozen backbone in eval mode while the head trains


def test_transfer_unfrozen_backbone_trains(tmp_path: Path) -> None:
    net = TransferNet(str(_phase1_checkpoint(tmp_path)), freeze_backbone=False)
    before = [p.clone() for p in net.backbone.parameters()]
    model = ImageClassifier(net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        model, _loader(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    )
    assert not all(torch.equal(a, b) for a, b in zip(before, net.backbone.parameters(), strict=True))


def test_transfer_checkpoint_errors_come_before_training(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist\. Train the run whose backbone you want first"):
        TransferNet(str(tmp_path / "missing.ckpt"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        TransferNet(str(junk))
    mnist = _phase1_checkpoint_mnist(tmp_path)  # gray images: the first thing that does not fit, said so
    with pytest.raises(CheckpointError, match=r"takes 1-channel images, these have 3 \(data\.channels\)"):
        TransferNet(str(mnist))
    other = tmp_path / "other.ckpt"  # RGB, but another architecture: the layer that differs is named
    state = {f"network.{k}": v for k, v in CIFARCNN().state_dict().items() if not k.startswith("backbone.3.")}
    torch.save({"state_dict": state}, other)
    with pytest.raises(CheckpointError, match="does not fit CIFARCNN's backbone") as info:
        TransferNet(str(other))
    assert "\n" not in str(info.value)  # one line: the first key that differs, not torch's whole list


def _phase1_checkpoint_mnist(tmp_path: Path) -> Path:
    path = tmp_path / "mnist.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in MNISTCNN().state_dict().items()}}, path)
    return path


def test_classifier_exposes_backbone_for_backbone_finetuning(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    net = TransferNet(str(_phase1_checkpoint(tmp_path)), freeze_backbone=False)
    model = ImageClassifier(net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    frozen_at_start = []

    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            frozen_at_start.append(not any(p.requires_grad for p in net.backbone.parameters()))

    data = _loader(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=2), Probe()],
    )
    trainer.fit(model, data)
    assert frozen_at_start == [True, True, False]


def test_one_cycle_scheduler_gets_the_runs_step_count() -> None:
    from functools import partial

    model = ImageClassifier(
        MNISTCNN(),
        num_classes=10,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.5),
    )
    data = _loader(torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,)), batch_size=4)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.total_steps == 6


@pytest.mark.slow
def test_compiled_network_trains_and_keeps_plain_checkpoint_keys(tmp_path: Path) -> None:
    model = ImageClassifier(MNISTCNN(), num_classes=10, compile=True, channels_last=True)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, _loader(torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    keys = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"].keys()
    assert "network.backbone.0.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_flip_test_time_averages_an_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(5, 3, 8, 8)
    plain, flipped = (
        ImageClassifier(network, num_classes=4),
        ImageClassifier(network, num_classes=4, flip_test_time=True),
    )
    expected = (network(x) + network(x.flip(-1))) / 2
    torch.testing.assert_close(flipped.eval_logits(x), expected)
    # the prediction no longer depends on the image's orientation; without the option it does
    torch.testing.assert_close(flipped.eval_logits(x.flip(-1)), flipped.eval_logits(x))
    assert not torch.allclose(plain.eval_logits(x.flip(-1)), plain.eval_logits(x))


def test_the_module_and_datamodule_work_in_every_order_lightning_allows(tmp_path: Path) -> None:
    """A baseline validate or test before fit, fit twice, test after fit: all in one process, as users call them."""
    import lightning as L
    from fakedata import make_image_folder

    from lightning_cnn.data import CIFAR10DataModule
    from lightning_cnn.models import CIFARCNN

    dm = CIFAR10DataModule(str(make_image_folder(tmp_path / "cifar10", per_class_train=2, per_class_test=1)),
                           batch_size=10, data_on_device=False)  # fmt: skip
    model = ImageClassifier(CIFARCNN(num_classes=10), num_classes=10)

    def trainer() -> L.Trainer:
        return L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip

    baseline = trainer().validate(model, dm)[0]["val/acc"]
    trainer().test(model, dm)
    fitting = trainer()
    fitting.fit(model, dm)  # crashed: "Inplace update to inference tensor outside InferenceMode"
    fitting.test(model, dm)
    trainer().fit(model, dm)
    assert 0.0 <= baseline <= 1.0 and "test/acc" in fitting.callback_metrics


def test_translate_test_time_averages_the_views_shifted_down_right_and_up_left() -> None:
    x = torch.rand(2, 1, 6, 6)
    model = ImageClassifier(nn.Flatten(), num_classes=36, translate_test_time=1)
    views = model.eval_logits(x).view(2, 6, 6)
    # inside the border each output mixes the pixel, its upper-left and its lower-right neighbour
    torch.testing.assert_close(views[:, 2:4, 2:4], (x[:, 0, 2:4, 2:4] + x[:, 0, 1:3, 1:3] + x[:, 0, 3:5, 3:5]) / 3)
    # with the mirror too: six views, and a constant image is seen the same in each
    both = ImageClassifier(nn.Flatten(), num_classes=36, flip_test_time=True, translate_test_time=1)
    torch.testing.assert_close(both.eval_logits(torch.full((1, 1, 6, 6), 0.5)), torch.full((1, 36), 0.5))
    for bad in (-1, 5):
        with pytest.raises(ConfigError, match="translate_test_time"):
            ImageClassifier(nn.Flatten(), num_classes=36, translate_test_time=bad)


def _smooth_images(n: int, size: int = 20) -> torch.Tensor:
    """Images whose neighbouring pixels and channels correlate, as photographs' do."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x + x.roll(1, 1)  # channels share signal
    return nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * 3


def test_whitening_makes_the_first_filters_decorrelate_the_patches() -> None:
    from lightning_cnn.models.whitening import patch_covariance, whiten_conv_

    conv = nn.Conv2d(3, 64, 3)
    before = conv.weight[54:].detach().clone()
    images = _smooth_images(64)
    covariance = patch_covariance(conv, images)
    assert whiten_conv_(conv, covariance, eps=1e-8) == 27  # 3x3x3 values per patch
    filters = conv.weight[:27].detach().double().flatten(1)
    torch.testing.assert_close(filters @ covariance @ filters.T, torch.eye(27, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(conv.weight[27:54], -conv.weight[:27])  # both signs pass the ReLU
    torch.testing.assert_close(conv.weight[54:], before)  # the rest keep their initialisation
    assert not conv.bias[:54].any()
    few = nn.Conv2d(3, 8, 3)  # fewer filters than directions: the 4 of most variance
    assert whiten_conv_(few, covariance) == 4


def test_whiten_first_conv_whitens_a_new_run_once_and_refuses_a_frozen_layer(tmp_path: Path) -> None:
    from lightning_cnn.models import WhitenFirstConv
    from lightning_cnn.models.whitening import patch_covariance, whiten_conv_

    images, labels = _smooth_images(16, size=32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True, generator=torch.Generator())

    def fit(epochs: int, ckpt: Path | None = None) -> ImageClassifier:
        torch.manual_seed(0)
        model = ImageClassifier(CIFARCNN(), num_classes=10,
                                optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # fmt: skip
        trainer = L.Trainer(max_epochs=epochs, callbacks=[WhitenFirstConv()], logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
        loader.generator.manual_seed(epochs)  # type: ignore[union-attr]
        trainer.fit(model, loader, ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / f"e{epochs}.ckpt")
        return model

    first_batch = next(iter(DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))))[0]  # fmt: skip
    whitened = fit(1).network.backbone[0].weight.detach().clone()  # lr 0: the weights the callback set
    reference = nn.Conv2d(3, 64, 3)
    whiten_conv_(reference, patch_covariance(reference, first_batch))
    torch.testing.assert_close(whitened[:54], reference.weight[:54].detach())  # from the batch the network saw first
    # resumed at the next epoch (another first batch): the checkpoint's weights stay
    resumed = fit(2, tmp_path / "e1.ckpt")
    torch.testing.assert_close(resumed.network.backbone[0].weight.detach(), whitened)

    frozen = ImageClassifier(CIFARCNN(), num_classes=10)
    frozen.network.backbone[0].weight.requires_grad_(False)
    trainer = L.Trainer(max_steps=1, callbacks=[WhitenFirstConv()], logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="frozen"):
        trainer.fit(frozen, loader)
