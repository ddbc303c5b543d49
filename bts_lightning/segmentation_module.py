"""The LightningModule: network, loss, metrics, optimizer and scheduler from plain configs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bts_lightning.data.channels import channels_setting
from bts_lightning.errors import ConfigError
from bts_lightning.losses import FactoredLoss, uses_distance_maps
from bts_lightning.metrics import SLICE_SCORES, SliceDetection, overlap_metrics
from bts_lightning.models.presence import PresenceGated
from bts_lightning.preprocessing import blank, standardize
from bts_lightning.runtime import as_number

log = logging.getLogger(__name__)


def _plain(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config) if config else None


def _check_learning_rate(optimizer: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` unless ``optimizer.lr`` (when given) is a positive number."""
    lr = optimizer.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
        raise ConfigError(f"optimizer.lr={lr} must be a positive number (e.g. optimizer.lr=1e-3).")


def _check_loss_weight(key: str, value: Any) -> float:
    """``value`` as a float; ``ConfigError`` naming ``model.<key>`` unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ConfigError(f"model.{key}={value} must be a number >= 0.")
    return float(value)


# Checkpoint entry of the module's data_settings (checkpoint.load_module reads older checkpoints' from their records).
DATA_SETTINGS_KEY = "bts_data_settings"
# Top-level checkpoint key holding the calibrated slice decision (``SliceDecision.to_dict()``), written by calibrate.
DECISION_KEY = "bts_decision"
# The last validation's {"tumor_slices": n, "empty_slices": m}, for a resumed run's metrics.json.
VAL_SLICES_KEY = "bts_val_slices"


def data_settings_of(datamodule: Any) -> dict[str, Any]:
    """``image_size``, ``channels`` (``"gray"`` or a list) and ``neighbours`` of a data module that has them
    (:class:`~bts_lightning.data.datamodule.BrainTumorDataModule`); ``{}`` for any other (or none)."""
    if datamodule is None or not all(hasattr(datamodule, key) for key in ("image_size", "channels", "neighbours")):
        return {}
    return {"image_size": int(datamodule.image_size), "channels": channels_setting(datamodule.channels),
            "neighbours": int(datamodule.neighbours)}


class SegmentationModule(L.LightningModule):
    """Trains a 2-class segmentation network on uint8 slices (``batch["image"]``, ``batch["mask"]``).

    ``conf/model/*.yaml`` is this class's config. Every argument is a plain value or a plain
    ``_target_`` config, saved as hyperparameters, so a checkpoint alone rebuilds the module (no
    pickled objects); network weights live only in the state dict.

    Args:
        net: ``_target_`` config of the network (``bts_lightning.models.build_model`` with a
            registry ``name`` and its options); ``forward`` returns ``{"out": logits[, "aux": logits or a
            list of logits][, "factors": logits]}`` (``aux``: auxiliary heads / deep supervision, for the
            training loss only; ``factors``: a presence-gated network's raw outputs, which its loss reads).
        loss: ``_target_`` config of a loss taking (N, C, H, W) logits and (N, 1, H, W) labels.
        optimizer: ``_partial_`` optimizer config, called with the parameters.
        scheduler: ``{"scheduler": _partial_ config or None, **lightning_keys}`` (monitor, interval), or None.
        compile: compile the network in place (``nn.Module.compile``; parameter names are kept).
        freeze_backbone_epochs: epochs the :class:`~bts_lightning.callbacks.BackboneFreeze` callback
            keeps a pretrained backbone frozen.
        aux_loss_weight: total weight of the loss on the auxiliary outputs, for networks that have them
            (see :meth:`compute_loss`).
        presence_loss_weight: for a network with a presence gate (``model.net.presence_gate=true``), the
            weight of its slice-presence term (:class:`~bts_lightning.losses.FactoredLoss`).

    ``data_settings``: what the network was trained on (``image_size``, ``channels``, ``neighbours`` of the data
    module it is fitted with; kept in its checkpoints and set again by ``checkpoint.load_module``,
    ``load_from_checkpoint`` and ``hub.from_pretrained``), so the model
    contract of a bare module (``export_model``, ``save_pretrained``, ``ModulePredictor``) is right. Empty: unknown.
    ``decision``: the calibrated slice decision of the weights it was loaded with (``SliceDecision.to_dict()``, from a
    checkpoint or hub folder), so ``ModelContract.from_module`` keeps it; cleared when fitting starts (new weights).
    ``card_metrics``: the training run's numbers a hub folder's model card shows (``hub.card_metrics``), set by
    ``hub.from_pretrained`` so that ``save_pretrained`` of the module keeps them; ``None``: none known.
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        compile: bool = False,
        freeze_backbone_epochs: int = 0,
        aux_loss_weight: float = 0.4,
        presence_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(compile, bool):
            raise ConfigError(f"model.compile={compile!r} must be true or false.")
        self.save_hyperparameters({
            "net": _plain(net), "loss": _plain(loss), "optimizer": _plain(optimizer), "scheduler": _plain(scheduler),
            "compile": compile,
            "freeze_backbone_epochs": int(as_number("model.freeze_backbone_epochs", freeze_backbone_epochs, whole=True,
                                                    minimum=0)),
            "aux_loss_weight": _check_loss_weight("aux_loss_weight", aux_loss_weight),
            "presence_loss_weight": _check_loss_weight("presence_loss_weight", presence_loss_weight),
        })
        _check_learning_rate(self.hparams.optimizer)
        self.data_settings: dict[str, Any] = {}
        self.card_metrics: dict[str, Any] | None = None
        self.decision: dict[str, Any] | None = None
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Instantiate the network; ``compile`` compiles it in place.

        ``nn.Module.compile`` keeps parameter names, so checkpoints move freely between
        compiled and uncompiled modules.
        """
        classes = self.hparams.net.get("num_classes", 2)
        if classes != 2:
            raise ConfigError(f"model.net.num_classes={classes}: the network segments tumor against background, 2 "
                              "classes (softmax channel 1 is the tumor); set model.net.num_classes=2.")
        self.net = instantiate(self.hparams.net)
        if self.hparams.compile:
            self.net.compile()

    def configure_losses(self) -> None:
        """Instantiate the loss; auxiliary outputs add ``aux_loss_weight`` times it (:meth:`compute_loss`).

        A presence-gated network trains on its raw outputs: the loss segments its tumor slices and
        ``presence_loss_weight`` weighs the slice-presence term (:class:`FactoredLoss`).
        """
        self.criterion = instantiate(self.hparams.loss)
        if isinstance(self.net, PresenceGated):
            self.criterion = FactoredLoss(self.criterion, self.hparams.presence_loss_weight)
        self.aux_loss_weight = self.hparams.aux_loss_weight

    def configure_metrics(self) -> None:
        """Per-image tumor Dice and IoU, and the slice-level scores (:class:`SliceDetection`), for validation and test.

        ``slice_counts[stage]``: ``{"tumor_slices": n, "empty_slices": m}`` of the last (non-sanity) epoch scored.
        """
        self.val_metrics = overlap_metrics("val/")
        self.test_metrics = overlap_metrics("test/")
        self.val_detection = SliceDetection()
        self.test_detection = SliceDetection()
        self.slice_counts: dict[str, dict[str, int]] = {}

    @property
    def pretrained(self) -> bool:
        """Whether the network started from pretrained weights."""
        return self.hparams.net.get("weights") is not None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Logits dict (``out`` and, for some models, ``aux``) for an (N, C, H, W) batch of any scale, standardized in
        float32 and given to the network in its weights' dtype (``trainer.precision=bf16-true`` etc. convert them)."""
        weight = next(self.net.parameters(), None)
        standardized = standardize(images)
        return self.net(standardized if weight is None else standardized.to(weight.dtype))

    @torch.no_grad()
    def predict_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Tumor probability (N, H, W) for an (N, 1, H, W) batch."""
        return self(images)["out"].float().softmax(dim=1)[:, 1]

    def compute_loss(
        self,
        outputs: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
        masks: torch.Tensor,
        distance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``out`` (of ``factors``, the raw outputs, when present) plus ``aux_loss_weight`` times the
        mean loss of the auxiliary outputs.

        ``outputs["aux"]`` (optional) is one logits tensor or a list of them (deep supervision): a list
        shares the weight evenly, so the auxiliary outputs weigh ``aux_loss_weight`` in total whatever
        their number. Computed in float32 even under mixed precision (fp16 Dice sums overflow on large masks).
        ``distance``: the masks' (N, 1, H, W) signed distance maps, passed on (for every output: all are at
        the masks' resolution) when the loss takes them (:func:`~bts_lightning.losses.uses_distance_maps`).
        """
        target = masks.unsqueeze(1).float()
        extras = {"distance": distance.float()} if distance is not None and uses_distance_maps(self.criterion) else {}
        aux = outputs.get("aux")
        heads = [] if aux is None else [aux] if isinstance(aux, torch.Tensor) else list(aux)
        with torch.autocast(device_type=self.device.type, enabled=False):
            loss = self.criterion(outputs.get("factors", outputs["out"]).float(), target, **extras)
            for head in heads:
                loss = loss + self.aux_loss_weight / len(heads) * self.criterion(head.float(), target, **extras)
        return loss

    def on_train_epoch_start(self) -> None:
        """Move epoch-scheduled loss weights (``WeightedLossSum.set_epoch``) to this epoch, also on resume; logs them."""
        if callable(set_epoch := getattr(self.criterion, "set_epoch", None)):
            for name, weight in set_epoch(self.current_epoch).items():
                self.log(f"train/loss_weight/{name}", weight)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(self(batch["image"]), batch["mask"], batch.get("distance"))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["mask"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        outputs = self(batch["image"])
        masks = batch["mask"]
        scored = {name: value for name, value in outputs.items() if name != "aux"}  # auxiliary outputs only train
        loss = self.compute_loss(scored, masks, batch.get("distance"))
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(masks))
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        preds = outputs["out"].argmax(dim=1)
        preds = torch.where(blank(batch["image"])[:, None, None], 0, preds)  # as inference: nothing on a blank slice
        metrics.update(preds, masks)
        self.log_dict(metrics, prog_bar=stage == "val")
        (self.val_detection if stage == "val" else self.test_detection).update(preds, masks)

    def _log_detection(self, stage: str) -> None:
        """Log ``{stage}/dice_tumor``, ``/sensitivity`` and ``/false_alarm_rate`` (each when measurable) and reset.

        Without empty slices there is no false-alarm rate: said once per fit (validation) or test run. A callback
        or the scheduler monitoring a score never logged (no slice of the group it needs) is a ``ConfigError``.
        The values are already reduced across ranks by :meth:`SliceDetection.compute`.
        """
        metric = self.val_detection if stage == "val" else self.test_detection
        if not metric.update_called:
            return
        values = metric.compute()
        metric.reset()
        counts = {name: int(values.pop(name)) for name in ("tumor_slices", "empty_slices")}
        for name, value in values.items():
            self.log(f"{stage}/{name}", value)
        if self.trainer.sanity_checking:
            return
        first = stage not in self.slice_counts
        self.slice_counts[stage] = counts
        self._check_monitors(stage, [name for name in SLICE_SCORES if name not in values])
        if counts["empty_slices"] == 0 and first and self.trainer.is_global_zero:
            log.info("%s split has no empty slice: no false-alarm rate (every slice shows a tumor)", stage)

    def _check_monitors(self, stage: str, missing: Sequence[str]) -> None:
        """Raise ``ConfigError`` when a callback or the learning-rate scheduler monitors a ``missing`` score."""
        monitors = [getattr(callback, "monitor", None) for callback in self.trainer.callbacks]
        monitors += [config.monitor for config in self.trainer.lr_scheduler_configs]
        for name in missing:
            if f"{stage}/{name}" in monitors:
                lacking = "empty slice (every slice shows a tumor)" if name == "false_alarm_rate" else "tumor slice"
                raise ConfigError(f"monitor.metric={stage}/{name} is never logged: the {stage} split has no {lacking}. "
                                  "Monitor val/dice or val/loss instead.")

    def on_fit_start(self) -> None:
        self.decision = None  # calibrated for the weights fitting changes
        if self.trainer.ckpt_path is None:  # a resumed fit keeps the count its checkpoint restored
            self.slice_counts.pop("val", None)
        settings = data_settings_of(getattr(self.trainer, "datamodule", None))
        if settings:
            self.data_settings = settings

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[DATA_SETTINGS_KEY] = dict(self.data_settings)
        checkpoint[VAL_SLICES_KEY] = self.slice_counts.get("val")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``SegmentationModule.load_from_checkpoint`` and resumed fits get the data settings (and any slice decision,
        and the last validation's slice counts) back."""
        self.data_settings = dict(checkpoint.get(DATA_SETTINGS_KEY) or {})
        counts = checkpoint.get(VAL_SLICES_KEY)
        if isinstance(counts, Mapping):
            self.slice_counts["val"] = dict(counts)
        decision = checkpoint.get(DECISION_KEY)
        self.decision = dict(decision) if isinstance(decision, Mapping) else None

    def on_test_start(self) -> None:
        self.slice_counts.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self._log_detection("val")

    def on_test_epoch_end(self) -> None:
        self._log_detection("test")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        schedule = dict(self.hparams.scheduler or {})
        if not schedule.get("scheduler"):
            return optimizer
        scheduler = instantiate(schedule.pop("scheduler"))(optimizer)
        every = getattr(self._trainer, "check_val_every_n_epoch", None)  # None before a trainer is attached
        if schedule.get("monitor") and schedule.get("interval", "epoch") == "epoch" and isinstance(every, int):
            schedule.setdefault("frequency", every)  # a validation metric's scheduler steps on the validating epochs
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **schedule}}
