"""Fine-tuning options: backbone learning rate, schedules, augmentation, early stopping."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import phantom_overrides, train_in_process
from tb_lightning.config import CONF_DIR
from tb_lightning.config.checks import check_augment
from tb_lightning.core.errors import ConfigError
from tb_lightning.data.augment import build_train_transform, is_random
from tb_lightning.models.classifier import TBClassifier
from tb_lightning.models.schedules import build_scheduler

NET = {"arch": "resnet18", "weights": None, "freeze_features": False, "hidden_dim": 8,
       "dropout": 0.0, "image_size": 64}  # fmt: skip


def test_backbone_lr_scale_makes_two_param_groups():
    model = TBClassifier(
        NET, {"_target_": "torch.optim.AdamW", "lr": 1e-3, "backbone_lr_scale": 0.1}, 0.5
    )
    optimizer = model.configure_optimizers()
    head_group, backbone_group = optimizer.param_groups
    assert head_group["lr"] == pytest.approx(1e-3)
    assert backbone_group["lr"] == pytest.approx(1e-4)
    assert len(head_group["params"]) == 4  # two Linear layers
    frozen = TBClassifier(
        {**NET, "freeze_features": True}, {"_target_": "torch.optim.Adam", "lr": 1e-3}, 0.5
    )
    assert len(frozen.configure_optimizers().param_groups) == 1


def test_cosine_with_warmup_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_scheduler(
        optimizer, {"name": "cosine", "warmup_epochs": 2, "warmup_start_factor": 0.1,
                    "min_lr_scale": 0.0}, max_epochs=6)["scheduler"]  # fmt: skip
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1)  # warm-up starts at 10%
    assert lrs[2] == pytest.approx(1.0)  # full lr after warm-up
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]  # then cosine decay


def test_cxr_augmentation_is_random_but_shape_preserving():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/x", "data/augment=cxr"])
    check_augment(cfg.data.augment)
    augment = dict(cfg.data.augment)
    assert is_random(augment) and not augment["horizontal_flip"]
    transform = build_train_transform(64, augment)
    image = torch.randint(0, 255, (3, 90, 80), dtype=torch.uint8)
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == (3, 64, 64) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    assert not is_random({})


def test_bad_augment_values_name_the_key():
    with pytest.raises(ConfigError, match="data.augment.rotation_degree is not"):
        check_augment({"rotation_degree": 5})
    with pytest.raises(ConfigError, match="data/augment=cxr"):
        check_augment("cxr")
    with pytest.raises(ConfigError, match="data.augment.brightness=-1"):
        check_augment({"brightness": -1})


def test_datamodule_applies_augmentation_to_train_only(phantom_root):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*phantom_overrides(phantom_root), "data/augment=cxr",
                                          "paths.output_dir=/tmp/x"])  # fmt: skip
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    # data/augment=cxr: the train transform draws anew each time, the val transform does not.
    image = torch.randint(0, 255, (3, 90, 80), dtype=torch.uint8)
    torch.manual_seed(0)
    assert not torch.equal(datamodule.train_transform(image), datamodule.train_transform(image))
    assert torch.equal(datamodule.transform(image), datamodule.transform(image))
    assert datamodule.train_dataloader().dataset.transform is datamodule.train_transform
    assert datamodule.val_dataloader().dataset.transform is datamodule.transform


@pytest.mark.slow
def test_fine_tuning_run_with_schedule_augmentation_and_early_stopping(phantom_root, tmp_path):
    train_in_process(
        [
            *phantom_overrides(phantom_root),
            "model.net.arch=resnet18",
            "model.net.freeze_features=false",
            "model.net.hidden_dim=32",
            "model.optimizer.backbone_lr_scale=0.5",
            "model/scheduler=cosine",
            "data/augment=cxr",
            "callbacks=early_stopping",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.early_stopping.patience=1",
            "trainer.max_epochs=3",
        ],
        tmp_path,
    )
    assert (tmp_path / "report.txt").is_file()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["scheduler"]["name"] == "cosine"
    assert len(checkpoint["lr_schedulers"]) == 1


@pytest.mark.slow
def test_nlm_scratch_recipe_runs_one_fold_and_reports_its_last_epoch(shared_data, tmp_path):
    """experiment=nlm_scratch on the real NLM images, cut to a few batches: fold 1 of 5 is the
    val split, and without a monitored checkpoint the report and threshold use last.ckpt."""
    metrics = train_in_process(
        [
            "experiment=nlm_scratch",
            f"data.root={shared_data / 'nlm-tb-128'}",
            f"data.scan_cache_dir={tmp_path / 'scan'}",
            "data.fold=1",
            "data.num_workers=0",
            "trainer=cpu",
            # Two epochs: the recipe's cosine schedule warms up for one.
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
        ],
        tmp_path / "run",
    )
    assert metrics["data.fold"] == 1 and metrics["data.num_folds"] == 5
    # 500 patients in 5 folds: 100 val images.
    assert sum(metrics["val_counts"].values()) == 100
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert metrics["checkpoint"] == "checkpoints/last.ckpt"  # relative to the run directory
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["operating_threshold"]["value"] == metrics["threshold"]["value"]
    hparams = checkpoint["hyper_parameters"]
    assert hparams["net"]["arch"] == "resnet18" and hparams["net"]["weights"] is None


def test_step_loss_reaches_tensorboard_every_log_every_n_steps(tmp_path):
    """training_step logs the step loss only on the steps the loggers write (each self.log costs
    Python time, and a GPU sync for the progress bar); TensorBoard still gets one point every
    trainer.log_every_n_steps steps, holding that step's own loss."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    from tb_lightning.data.feature_cache import FeatureDataset

    class StepLosses(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    model = TBClassifier(
        {"arch": "alexnet", "weights": None, "image_size": 64, "pool_size": 1, "hidden_dim": 8},
        {"_target_": "torch.optim.Adam", "lr": 1e-3},
        threshold=0.5,
    )
    logged: list[str] = []
    log = model.log

    def counting_log(name, *args, **kwargs):
        logged.append(name)
        return log(name, *args, **kwargs)

    model.log = counting_log
    features = FeatureDataset(torch.randn(40, 256).half(), [i % 3 == 0 for i in range(40)])
    recorder = StepLosses()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        log_every_n_steps=2,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=[recorder],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(features, batch_size=8))  # 5 steps per epoch, 10 in all
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    points = events.Scalars("train/loss_step")
    # Lightning writes after steps 2, 4, ..., 10, each under the index of the step (0-based).
    assert [p.step for p in points] == [1, 3, 5, 7, 9]
    assert [p.value for p in points] == pytest.approx([recorder.losses[p.step] for p in points])
    assert logged.count("train/loss_step") == 5  # not once per step
    # Outside a Trainer (a hand-written loop) the step is always "logged".
    outside = TBClassifier(NET, {"_target_": "torch.optim.Adam", "lr": 1e-3}, threshold=0.5)
    assert outside._loggers_write_this_step()
