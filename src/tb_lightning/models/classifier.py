"""The LightningModule: the network, the class-weighted loss, and the metrics per split."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from tb_lightning.core.choices import focal_gamma_of, loss_label
from tb_lightning.models.metrics import ClassificationMetrics
from tb_lightning.models.net import build_net
from tb_lightning.models.schedules import build_scheduler, scheduler_name

log = logging.getLogger(__name__)


def to_plain_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    """Hydra hands over DictConfigs; checkpoints should hold plain Python values only."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    return dict(value)


class TBClassifier(L.LightningModule):
    """Binary TB classifier on one logit, trained with a pos_weight-balanced loss: BCE, or the
    focal loss (model.loss=focal; stats/loss.py has the formula the reports recompute).

    Args (`model.*`, stated with their defaults in conf/model/alexnet.yaml):
        net: keyword arguments of `build_net` (`model.net.*`).
        optimizer: a `_target_` optimizer config (`model.optimizer.*`), instantiated over the
            trainable parameters.
        threshold: TB probability at or above which an image is called Tuberculosis.
        scheduler: `model.scheduler.*`; None (checkpoints loaded for inference): none.
        preprocess: the images' preprocessing, {name, clip_limit, tile_grid}. Not a `model.*`
            key: the data module hands it over at setup (data.preprocess, data.clahe); given
            here only when a checkpoint's module is rebuilt (trained/checkpoint.py).
        tta: test-time augmentation (`model.tta`): None, or "hflip" for the mean logit of each
            image and its mirror wherever the model is used out of training (models/net.py).
        loss: `model.loss`: "bce" (binary cross-entropy) or "focal" (torchvision's
            sigmoid_focal_loss), both with the class weight on TB.
        focal_gamma: `model.focal_gamma`, the focal loss's gamma (2 when None); only with
            loss="focal" (config/checks.py refuses it with bce).
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        threshold: float,
        scheduler: Mapping[str, Any] | None = None,
        preprocess: Mapping[str, Any] | None = None,
        tta: str | None = None,
        loss: str = "bce",
        focal_gamma: float | None = None,
    ) -> None:
        super().__init__()
        net, optimizer = to_plain_dict(net), to_plain_dict(optimizer)
        scheduler = to_plain_dict(scheduler) if scheduler else None
        # `preprocess` is not used here: it is kept in the hyper-parameters (and so in every
        # checkpoint) for eval, predict and export to rebuild the images' preprocessing.
        preprocess = to_plain_dict(preprocess) if preprocess else None
        self.save_hyperparameters(
            {
                "net": net,
                "optimizer": optimizer,
                "threshold": threshold,
                "scheduler": scheduler,
                "preprocess": preprocess,
                "tta": tta,
                "loss": loss,
                "focal_gamma": focal_gamma,
            }
        )
        # 0 for BCE: the focal loss at gamma 0 is the weighted BCE (stats/loss.py).
        self.focal_gamma = focal_gamma_of(loss, focal_gamma)
        self.net = build_net(**net)
        self.net.tta = tta
        # Set from the DataModule's train split in setup(); saved in checkpoints with the weights.
        self.register_buffer("pos_weight", torch.tensor(1.0))
        # Temperature scaling (calibration=temperature): logits are divided by it. 1 while
        # training; fitted on the val split at the end and stored in the checkpoint beside the
        # weights (key `calibration`, not in the state_dict, so older checkpoints load as they
        # are); trained/checkpoint.py sets it back when a checkpoint is loaded.
        self.register_buffer("temperature", torch.tensor(1.0), persistent=False)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_metrics = ClassificationMetrics("train", threshold, at_threshold=False)
        self.val_metrics = ClassificationMetrics("val", threshold)
        # The last validation epoch's [[TN, FP], [FN, TP]] at `threshold`, for the confusion
        # matrix image in TensorBoard (engine/dashboard.py, ValConfusionImage).
        self.val_confusion: list[list[int]] = []

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage != "fit" or datamodule is None:
            return
        settings = getattr(datamodule, "preprocess_settings", None)
        if settings is not None:
            # What the images this module trains on went through, from the data module that
            # makes them (data.preprocess, data.clahe): saved with the hyper-parameters, and so
            # in every checkpoint, for eval, predict and export to rebuild. Saved again rather
            # than set, so that the loggers' copy (hparams_initial) has it too.
            self.save_hyperparameters({"preprocess": to_plain_dict(settings)})
        if hasattr(datamodule, "pos_weight"):
            self.pos_weight.fill_(datamodule.pos_weight)
            n_normal, n_tb = datamodule.class_counts("train")
            log.info(
                "Class weights from the train split (%d Normal, %d Tuberculosis): "
                "Normal 1.0, Tuberculosis %.4f (the loss: %s)",
                n_normal,
                n_tb,
                self.pos_weight.item(),
                loss_label(self.focal_gamma),
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """TB logits, shape (N,), from images (N, 3, H, W) or cached backbone features (N, D)."""
        if images.dim() == 2:  # served by the feature cache (data/feature_cache.py)
            return self.net.forward_head(images) / self.temperature
        return self.net(images) / self.temperature

    def training_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss over a batch: the mean over images of the class-weighted BCE
        (gamma 0) or focal loss (stats/loss.py has the same formula in NumPy)."""
        if self.focal_gamma == 0:
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight)
        from torchvision.ops import sigmoid_focal_loss

        # alpha=-1: no alpha balancing inside; the class weight is applied as BCE's pos_weight
        # is, so that gamma 0 gives the weighted BCE exactly.
        per_image = sigmoid_focal_loss(
            logits, targets, alpha=-1, gamma=self.focal_gamma, reduction="none"
        )
        weights = torch.where(targets == 1, self.pos_weight, torch.ones_like(self.pos_weight))
        return (per_image * weights).mean()

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], loss_metric: MeanMetric, metrics: Any
    ) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.training_loss(logits, labels.float())
        loss_metric.update(loss.detach(), weight=labels.numel())
        metrics.update(torch.sigmoid(logits.detach()), labels)
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss = self._shared_step(batch, self.train_loss, self.train_metrics)
        if self._loggers_write_this_step():
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning writes step metrics to the loggers after this training step.

        Each self.log call costs Lightning about 0.6 ms of Python, and a progress-bar value is
        read back from the GPU after every step it is logged in: on cached features, whose steps
        take a few milliseconds on a GPU, that is a large share of each step (README,
        Benchmarks). The step loss is logged only on the steps the loggers record (every
        trainer.log_every_n_steps), so TensorBoard gets the same points.
        """
        if self._trainer is None:  # called outside a Trainer (tests, hand loops)
            return True
        connector = getattr(self.trainer, "_logger_connector", None)
        writes = getattr(connector, "should_update_logs", True)
        return bool(writes or self.trainer.fast_dev_run)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, self.val_loss, self.val_metrics)

    def on_train_epoch_end(self) -> None:
        self._log_epoch(self.train_loss, self.train_metrics)
        # The learning rate of the head (the first parameter group) as a train curve, rather
        # than LearningRateMonitor's `lr-AdamW` tag, which TensorBoard would sort into a group
        # of its own ahead of the metrics.
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self) -> None:
        self.val_confusion = self.val_metrics.confusion_matrix().tolist()
        self._log_epoch(self.val_loss, self.val_metrics, progress_bar=("val/loss", "val/auroc"))

    def _log_epoch(
        self,
        loss_metric: MeanMetric,
        metrics: ClassificationMetrics,
        progress_bar: tuple[str, ...] = (),
    ) -> None:
        """Log the epoch's loss, AUROC and the figures at the fixed threshold (`val@0.5/acc`);
        the `progress_bar` ones also on the terminal's progress bar."""
        values = {f"{metrics.split}/loss": loss_metric.compute(), **metrics.compute()}
        shown = {k: v for k, v in values.items() if k in progress_bar}
        self.log_dict({k: v for k, v in values.items() if k not in shown})
        self.log_dict(shown, prog_bar=True)
        loss_metric.reset()
        metrics.reset()

    def configure_optimizers(self) -> Any:
        settings = dict(self.hparams.optimizer)
        # Optional (conf/model/alexnet.yaml states it): without it the backbone, when trained,
        # learns at the head's rate.
        backbone_scale = settings.pop("backbone_lr_scale", 1.0)
        head = [p for p in self.net.head.parameters() if p.requires_grad]
        backbone = [p for p in self.net.features.parameters() if p.requires_grad]
        groups = [{"params": head}]
        if backbone:
            groups.append({"params": backbone, "lr": settings["lr"] * backbone_scale})
        # A partial, then called: Hydra would turn the param-group dicts into DictConfigs.
        optimizer = instantiate(settings, _partial_=True)(groups)
        if scheduler_name(self.hparams.scheduler) == "none":
            return optimizer
        schedule = build_scheduler(optimizer, self.hparams.scheduler, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}
