"""The cascade: one checkpoint's segmentation on the slices another checkpoint says have a tumor."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from bts_lightning.cascade import cascade
from bts_lightning.checkpoint import DECISION_KEY, load_module, write_decision
from bts_lightning.decision import SliceDecision
from bts_lightning.errors import ConfigError
from bts_lightning.evaluate import evaluate
from bts_lightning.export import export_model
from bts_lightning.hub import save_pretrained
from bts_lightning.inference import ONNX_CONTRACT_KEY, load_predictor, predict_probabilities
from bts_lightning.models.cascade import Cascade, build_cascade, cascade_of
from bts_lightning.models.presence import PresenceGated
from bts_lightning.preprocessing import standardize
from bts_lightning.train import train
from tests.conftest import assert_one_error_line, compose_app, compose_train, run_cli

SIZE = 32


class FixedLogits(nn.Module):
    """A 2-class 'network' whose tumor logit is ``scale`` times its input (so flips change its output)."""

    def __init__(self, scale: float = 1.0, size_multiple: int = 1) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.size_multiple = size_multiple

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tumor = self.scale * x[:, :1]
        return {"out": torch.cat([torch.zeros_like(tumor), tumor], dim=1)}


def test_the_segmentation_is_kept_where_the_presence_probability_is_above_the_threshold():
    """Mask = segmentation mask on slices whose presence probability > threshold, empty on the others."""
    segmentation, presence = FixedLogits(1.0), FixedLogits(1.0)
    images = torch.full((3, 1, 4, 4), -2.0)
    images[:, :, 1, 1] = torch.tensor([3.0, 0.4, -1.0])[:, None]  # presence peaks: p = 0.95, 0.60, 0.27
    joined = build_cascade(segmentation, presence, presence_threshold=0.5, flips=False)
    assert isinstance(joined, PresenceGated) and isinstance(joined.net, Cascade)
    probability = joined(images)["out"].softmax(dim=1)[:, 1]
    expected = torch.sigmoid(images[:, 0]) > 0.5
    assert torch.equal(probability > 0.5, expected & torch.tensor([True, True, False])[:, None, None])
    strict = build_cascade(segmentation, presence, presence_threshold=float(torch.sigmoid(torch.tensor(3.0))),
                           flips=False)
    assert not (strict(images)["out"].softmax(dim=1)[:, 1] > 0.5).any()  # equal to the threshold: no tumor
    assert torch.allclose(joined.net.presence_probability(images), torch.sigmoid(torch.tensor([3.0, 0.4, -1.0])))


def test_a_slice_at_the_threshold_does_not_pass_the_gate():
    """Calibration's threshold is one empty slice's own presence probability, and the gate passes only slices above
    it, as calibration counts them (a float32 logit against a float64 one let about one in six of them through)."""
    images = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    joined = Cascade(FixedLogits(), FixedLogits(0.5), flips=False)
    probabilities = joined.presence_probability(images)
    for index, probability in enumerate(probabilities.tolist()):
        joined.presence_threshold = probability
        passes = joined.gate_logit(images) > 0
        assert not passes[index] and torch.equal(passes, probabilities > probability), index


def test_flips_average_the_presence_maps_before_their_largest_value():
    """With flips: max over pixels of the mean of the maps of x, flip(x) flipped back, vflip(x) flipped back."""

    class Asymmetric(nn.Module):  # tumor logit = x + a left-to-right / top-to-bottom ramp: flips change it
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            ramp = torch.linspace(-1, 1, x.shape[-1])
            tumor = x[:, :1] + ramp[None, None, None, :] + 2 * ramp[None, None, :, None]
            return {"out": torch.cat([torch.zeros_like(tumor), tumor], dim=1)}

    images = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    joined = Cascade(FixedLogits(), Asymmetric(), flips=True)

    def probability_map(batch: torch.Tensor) -> torch.Tensor:
        return Asymmetric()(batch)["out"].softmax(dim=1)[:, 1]

    mean = (probability_map(images) + probability_map(images.flip(-1)).flip(-1)
            + probability_map(images.flip(-2)).flip(-2)) / 3
    assert torch.allclose(joined.presence_probability(images), mean.flatten(1).amax(dim=1))
    unflipped = Cascade(FixedLogits(), Asymmetric(), flips=False).presence_probability(images)
    assert not torch.allclose(unflipped, mean.flatten(1).amax(dim=1))


def test_an_ensemble_of_presence_networks_averages_their_maps():
    images = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    members = [FixedLogits(1.0), FixedLogits(-2.0)]
    ensemble = Cascade(FixedLogits(), members, flips=False)
    mean = torch.stack([torch.sigmoid(scale * images[:, 0]) for scale in (1.0, -2.0)]).mean(dim=0)
    assert torch.allclose(ensemble.presence_probability(images), mean.flatten(1).amax(dim=1))
    assert sorted(key for key in ensemble.state_dict() if key.startswith("presence")) == ["presence.0.scale",
                                                                                        "presence.1.scale"]
    single = Cascade(FixedLogits(), [FixedLogits(1.0)], flips=False)  # a one-network list is the single network
    assert "presence.scale" in single.state_dict()
    assert build_cascade(FixedLogits(size_multiple=2), members + [FixedLogits(size_multiple=3)]).size_multiple == 6
    with pytest.raises(ConfigError, match="at least one presence network"):
        Cascade(FixedLogits(), [])


def test_size_rules_and_bad_settings():
    joined = build_cascade(FixedLogits(size_multiple=4), FixedLogits(size_multiple=6))
    assert joined.size_multiple == 12 and joined.dynamic_size
    for settings, message in (({"presence_threshold": 1.5}, "presence_threshold=1.5 must be a number in"),
                              ({"num_classes": 3}, "binary model"),
                              ({"weights": "imagenet"}, "weights='imagenet' must be null")):
        with pytest.raises(ConfigError, match=message):
            build_cascade(FixedLogits(), FixedLogits(), **settings)


DATA = ["data=synthetic_empty", "data.synthetic.n=40", f"data.synthetic.size={SIZE}", "data.batch_size=4",
        "data.num_workers=0", "trainer=cpu", "trainer.max_epochs=2", "logger=csv", "test=false",
        "model.net.channels=[8,16,32]", "model.net.strides=[2,2]", "model.net.num_res_units=1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tumor-only run and a run with empty slices (the slice term), on the same split; and one on another split."""
    root = tmp_path_factory.mktemp("cascade")
    data = [*DATA, f"paths.data_dir={root / 'data'}"]
    runs = {"segmentation": [*data, "data.empty_fraction=0"], "presence": [*data, "loss=dice_ce_slice"],
            "presence_seed_1": [*data, "loss=dice_ce_slice", "seed=1", "data.seed=42"],
            "other_split": [*data, "data.val_fold=3", "trainer.max_epochs=1"]}
    paths = {"data": root / "data"}
    for name, overrides in runs.items():
        torch.manual_seed(0)
        train(compose_train(overrides, root / name))
        paths[name] = root / name / "checkpoints" / "last.ckpt"
    return paths


def _join(two_runs: dict[str, Path], out: Path, *extra: str) -> dict:
    cfg = compose_app("cascade", [f"segmentation={two_runs['segmentation']}", f"presence={two_runs['presence']}",
                                  *extra], out)
    return cascade(cfg, [])


def _clear_of(threshold: float, scores) -> torch.Tensor:
    """Slices whose presence probability is not within float32 rounding of ``threshold``: an exported file may judge
    those otherwise than PyTorch (its gate is a step there), and calibration puts one val slice exactly at it."""
    clear = torch.as_tensor(np.abs(np.asarray(scores, dtype=np.float64) - threshold) > 1e-4)
    assert int((~clear).sum()) <= 1
    return clear


def test_the_cascade_app_joins_calibrates_and_writes_an_ordinary_checkpoint(two_runs, tmp_path):
    """The presence threshold is the calibrated one of the presence run's flip-averaged probabilities on the val
    split; the joined checkpoint's masks are the segmentation run's on the slices above it; evaluate and export take it."""
    result = _join(two_runs, tmp_path / "run", "target_false_alarm_rate=0.25")
    output = tmp_path / "run" / "checkpoints" / "cascade.ckpt"
    assert json.loads((tmp_path / "run" / "cascade.json").read_text()) == json.loads(json.dumps(result))

    # The oracle: both runs' own predictors, on the val split as training split it.
    datamodule = instantiate(compose_train([*DATA, f"paths.data_dir={two_runs['data']}"], tmp_path / "x").data,
                             augmentations=None)
    datamodule.setup("validate")
    images, masks = zip(*(datamodule.datasets["val"].load(i) for i in range(len(datamodule.datasets["val"]))))
    images, has_tumor = np.stack(images), np.array([mask.any() for mask in masks])
    presence = predict_probabilities(load_predictor(two_runs["presence"], "cpu"), images, tta=True)
    scores = presence.flatten(1).amax(dim=1).numpy()
    empty = sorted(scores[~has_tumor], reverse=True)
    expected_threshold = empty[math.floor(0.25 * len(empty) + 1e-9)]
    assert result["presence_threshold"] == pytest.approx(expected_threshold, abs=1e-6)
    assert result["presence_on_split"]["false_alarm_rate"] <= 0.25
    assert result["presence_on_split"]["n_empty"] == int((~has_tumor).sum()) > 0

    stored = torch.load(output, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in stored and stored[DECISION_KEY]["calibration"]["split"] == "val"
    assert stored["hyper_parameters"]["net"]["segmentation"]["_target_"] == "bts_lightning.models.build_model"
    joined = load_predictor(output, "cpu")
    segmentation = predict_probabilities(load_predictor(two_runs["segmentation"], "cpu"), images)
    keep = torch.as_tensor(scores > result["presence_threshold"])[:, None, None]
    assert torch.equal(predict_probabilities(joined, images) > 0.5, (segmentation > 0.5) & keep)
    # A slice that passes keeps the segmentation's own probabilities (so its mask at any pixel threshold, or resized
    # before thresholding as predict does, is the segmentation's); the others have none.
    probabilities, kept = predict_probabilities(joined, images), keep[:, 0, 0]
    assert kept.any() and (~kept).any()
    assert torch.allclose(probabilities[kept], segmentation[kept], atol=1e-4) and not probabilities[~kept].any()
    # Flip TTA averages the segmentation only: the presence, decided on the slice as given, passes the same slices.
    segmentation_tta = predict_probabilities(load_predictor(two_runs["segmentation"], "cpu"), images, tta=True)
    assert torch.equal(predict_probabilities(joined, images, tta=True) > 0.5, (segmentation_tta > 0.5) & keep)

    metrics = evaluate(compose_app("evaluate", [f"ckpt_path={output}", "split=val"], tmp_path / "eval"),
                       [f"ckpt_path={output}", "split=val"])
    assert metrics["empty_slices"]["false_alarm_rate"] <= 0.25
    assert metrics["cascade"] == {"presence_threshold": result["presence_threshold"], "presence_networks": 1,
                                  "flips": True, "context": 0, "context_threshold": None}
    module = load_module(output)
    onnx = load_predictor(export_model(module, tmp_path / "cascade.onnx", image_size=SIZE), "cpu")
    clear = _clear_of(result["presence_threshold"], scores)
    assert torch.allclose(predict_probabilities(onnx, images)[clear], predict_probabilities(joined, images)[clear],
                          atol=1e-4)
    folder = load_predictor(save_pretrained(output, tmp_path / "hub"), "cpu")
    assert folder.contract.model == "cascade" and folder.contract.decision == joined.contract.decision
    assert torch.equal(predict_probabilities(folder, images), predict_probabilities(joined, images))


def test_target_on_new_slices_calibrates_every_cascade_threshold_for_new_empty_slices(two_runs, tmp_path):
    on_split = _join(two_runs, tmp_path / "split", "target_false_alarm_rate=0.25")
    result = _join(two_runs, tmp_path / "new", "target_false_alarm_rate=0.25", "target_on=new_slices")
    presence, n_empty = result["presence_on_split"], result["presence_on_split"]["n_empty"]
    assert result["target_on"] == "new_slices" and on_split["target_on"] == "split"
    # k = floor(0.25 * (n + 1)) - 1 of the val empty slices above the presence threshold (no ties in these scores)
    assert round(presence["false_alarm_rate"] * n_empty) == math.floor(0.25 * (n_empty + 1)) - 1
    assert round(on_split["presence_on_split"]["false_alarm_rate"] * n_empty) == math.floor(0.25 * n_empty)
    assert presence["on_new_empty_slices"]["expected_false_alarm_rate"] <= 0.25
    assert result["presence_threshold"] > on_split["presence_threshold"]
    assert result["decision"]["target_on"] == "new_slices"
    stored = torch.load(tmp_path / "new" / "checkpoints" / "cascade.ckpt", map_location="cpu", weights_only=True)
    assert stored[DECISION_KEY] == result["decision"]
    with pytest.raises(ConfigError, match=f"has {n_empty} empty slices, too few .* needs at least 19"):
        _join(two_runs, tmp_path / "few", "target_false_alarm_rate=0.05", "target_on=new_slices")
    assert not (tmp_path / "few" / "checkpoints").exists()


def test_checkpoints_of_other_splits_or_types_are_refused(two_runs, tmp_path):
    with pytest.raises(ConfigError, match="trained on different splits"):
        _join({**two_runs, "presence": two_runs["other_split"]}, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model.onnx is not a training checkpoint \(.ckpt\)"):
        _join({**two_runs, "presence": tmp_path / "model.onnx"}, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    _join(two_runs, tmp_path / "first", "target_false_alarm_rate=0.25")
    joined = tmp_path / "first" / "checkpoints" / "cascade.ckpt"
    for key in ("segmentation", "presence"):  # a cascade of a cascade would gate twice on one calibration split
        with pytest.raises(ConfigError, match=f"{key}={joined} is a cascade already"):
            _join({**two_runs, key: joined}, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _without_parts(exported: Path, out: Path) -> Path:
    """A copy of the exported ONNX cascade ``exported`` whose contract does not mention its parts (an older export)."""
    import onnx

    proto = onnx.load(str(exported))
    for entry in proto.metadata_props:
        if entry.key == ONNX_CONTRACT_KEY:
            entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items() if k != "cascade_parts"})
    onnx.save(proto, str(out))
    return out


def test_an_exported_cascade_does_flip_tta_as_its_checkpoint(two_runs, tmp_path, caplog):
    """ONNX and TorchScript files carry the cascade's parts, so flip TTA averages the segmentation alone and gates it
    by the presence of the slice as given, as the checkpoint does; a file exported before them says what to do."""
    _join(two_runs, tmp_path / "run", "target_false_alarm_rate=0.25")
    output = tmp_path / "run" / "checkpoints" / "cascade.ckpt"
    joined = load_predictor(output, "cpu")
    datamodule = instantiate(compose_train([*DATA, f"paths.data_dir={two_runs['data']}"], tmp_path / "x").data,
                             augmentations=None)
    datamodule.setup("validate")
    val = datamodule.datasets["val"]
    images = torch.as_tensor(np.stack([val.load(i)[0] for i in range(len(val))]))
    expected = predict_probabilities(joined, images, tta=True)
    with torch.no_grad():
        gates = torch.sigmoid(cascade_of(joined).gate_logit(standardize(images)))
        segmentation_expected = cascade_of(joined).segmentation_probability(standardize(images))
        clear = _clear_of(cascade_of(joined).presence_threshold,
                          cascade_of(joined).presence_probability(standardize(images)))
    # a step: some slices pass the presence threshold (gate open), the others do not (shut)
    assert ((gates == 0) | (gates == 1)).all() and (gates == 1).any() and (gates == 0).any()
    for name in ("cascade.onnx", "cascade.pt"):
        exported = load_predictor(export_model(load_module(output), tmp_path / name, image_size=SIZE), "cpu")
        assert exported.contract.cascade_parts
        segmentation, file_gates = exported.parts(images)
        torch.testing.assert_close(file_gates[clear], gates[clear], atol=1e-5, rtol=0)
        torch.testing.assert_close(segmentation, segmentation_expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(predict_probabilities(exported, images, tta=True)[clear], expected[clear], atol=1e-4,
                                   rtol=0)
        torch.testing.assert_close(predict_probabilities(exported, images)[clear],
                                   predict_probabilities(joined, images)[clear], atol=1e-4, rtol=0)
    # Not a cascade: no parts.
    plain = load_predictor(export_model(load_module(two_runs["segmentation"]), tmp_path / "plain.onnx",
                                        image_size=SIZE), "cpu")
    assert not plain.contract.cascade_parts
    with pytest.raises(ValueError, match="does not give a cascade's parts"):
        plain.parts(images)
    # A cascade exported before the parts: runs whole on each flipped view, and says how to do better.
    with caplog.at_level("WARNING"):
        older = load_predictor(_without_parts(tmp_path / "cascade.onnx", tmp_path / "older.onnx"), "cpu")
    assert "exported without its parts" in caplog.text and "re-export it" in caplog.text
    assert (predict_probabilities(older, images, tta=True) - expected).abs().max() > 1e-2  # what the parts fix
    whole = sum(predict_probabilities(older, images.flip(dim)).flip(dim) for dim in (-1, -2))
    torch.testing.assert_close(predict_probabilities(older, images, tta=True),
                               (predict_probabilities(older, images) + whole) / 3, atol=1e-5, rtol=0)

    # The Space app (NumPy and onnxruntime only) does the same with the parts of its model.onnx.
    space_app = pytest.importorskip("bts_lightning.space_app")
    model = space_app.Model.load(tmp_path / "cascade.onnx")
    assert model.cascade_parts and not space_app.Model.load(tmp_path / "older.onnx").cascade_parts
    found = np.stack([space_app.probabilities(model, image, tta=True) for image in images.numpy()])
    np.testing.assert_allclose(found[clear.numpy()], expected[clear].numpy(), atol=1e-4, rtol=0)


def test_a_cascade_with_a_presence_ensemble_calibrates_their_mean_and_travels(two_runs, tmp_path):
    members = [two_runs["presence"], two_runs["presence_seed_1"]]
    cfg = compose_app("cascade", [f"segmentation={two_runs['segmentation']}",
                                  f"presence=[{members[0]},{members[1]}]", "target_false_alarm_rate=0.25"],
                      tmp_path / "run")
    result = cascade(cfg, [])
    assert result["presence"] == [str(path.resolve()) for path in members]
    datamodule = instantiate(compose_train([*DATA, f"paths.data_dir={two_runs['data']}"], tmp_path / "x").data,
                             augmentations=None)
    datamodule.setup("validate")
    images, masks = zip(*(datamodule.datasets["val"].load(i) for i in range(len(datamodule.datasets["val"]))))
    images, has_tumor = np.stack(images), np.array([mask.any() for mask in masks])
    maps = [predict_probabilities(load_predictor(path, "cpu"), images, tta=True) for path in members]
    scores = torch.stack(maps).mean(dim=0).flatten(1).amax(dim=1).numpy()
    alone = maps[0].flatten(1).amax(dim=1).numpy()
    assert not np.allclose(scores, alone, atol=1e-3)  # the second member changes the scores
    empty = sorted(scores[~has_tumor], reverse=True)
    assert result["presence_threshold"] == pytest.approx(empty[math.floor(0.25 * len(empty) + 1e-9)], abs=1e-5)

    output = tmp_path / "run" / "checkpoints" / "cascade.ckpt"
    joined = load_predictor(output, "cpu")
    segmentation = predict_probabilities(load_predictor(two_runs["segmentation"], "cpu"), images)
    keep = torch.as_tensor(scores > result["presence_threshold"])[:, None, None]
    assert torch.equal(predict_probabilities(joined, images) > 0.5, (segmentation > 0.5) & keep)
    onnx = load_predictor(export_model(load_module(output), tmp_path / "cascade.onnx", image_size=SIZE), "cpu")
    clear = _clear_of(result["presence_threshold"], scores)
    assert torch.allclose(predict_probabilities(onnx, images)[clear], predict_probabilities(joined, images)[clear],
                          atol=1e-4)
    folder = load_predictor(save_pretrained(output, tmp_path / "hub"), "cpu")
    assert torch.equal(predict_probabilities(folder, images), predict_probabilities(joined, images))

    copied = tmp_path / "copy.ckpt"
    shutil.copy(members[0], copied)
    calibrated = tmp_path / "calibrated.ckpt"  # a copy whose file differs: a decision stored in it
    shutil.copy(members[0], calibrated)
    write_decision(calibrated, SliceDecision("component_fraction", 0.01, 0.5, 0.05, {"split": "val"}).to_dict())
    respelled = Path(members[0]).parent / ".." / "checkpoints" / Path(members[0]).name
    for presence, message in ((f"[{members[0]},{members[0]}]", "lists a checkpoint twice"),
                              (f"[{members[0]},{respelled}]", r"lists a checkpoint twice \(.* are the same file\)"),
                              (f"[{members[0]},{copied}]", r"lists a checkpoint twice \(.* are copies of one network\)"),
                              (f"[{members[0]},{calibrated}]", r"lists a checkpoint twice \(.* are copies of one net"),
                              (f"[{members[0]},{two_runs['other_split']}]", "trained on different splits"),
                              ("[]", r"presence=\[\] lists no checkpoint")):
        bad = compose_app("cascade", [f"segmentation={two_runs['segmentation']}", f"presence={presence}"],
                          tmp_path / "bad")
        with pytest.raises(ConfigError, match=message):
            cascade(bad, [])
    before = Path(members[1]).read_bytes()
    for output in (members[1], respelled):  # would replace a training checkpoint it joins
        bad = compose_app("cascade", [f"segmentation={two_runs['segmentation']}", f"presence=[{members[0]},{members[1]}]",
                                      f"output={output}"], tmp_path / "bad")
        with pytest.raises(ConfigError, match=r"output=.* is one of the checkpoints it joins"):
            cascade(bad, [])
    assert Path(members[1]).read_bytes() == before


@pytest.mark.slow  # an app subprocess
def test_the_cli_says_what_is_missing_in_one_line(two_runs, tmp_path):
    result = run_cli(["bts_lightning.cascade", f"segmentation={two_runs['segmentation']}"], tmp_path)
    assert_one_error_line(result, "presence is required")
