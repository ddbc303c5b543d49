"""benchmarks/model_table.py: the README's model table command."""

from __future__ import annotations

import pytest
import torch

from benchmarks import model_table
from bts_lightning.errors import ConfigError


def test_rows_are_measured_for_a_real_model(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert model_table.main(["--models", "unet", "--image-size", "32", "--batch-size", "1", "--repeats", "1",
                             "--threads", "1", "--out", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out + "\n"
    header, _, row = table.splitlines()[:3]
    assert header.startswith("| model | source")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["unet", "MONAI"] and cells[-1] == "dynamic"
    params, gflop, ms = (float(value) for value in cells[2:5])
    assert 1.0 < params < 3.0 and gflop > 0 and ms > 0


def test_flops_scale_with_the_slice_area():
    module = model_table.build("unet", 64)
    assert model_table.forward_gflop(module, 64) == pytest.approx(4 * model_table.forward_gflop(module, 32), rel=0.01)


def test_source_is_the_library_of_the_network():
    assert model_table.source_library(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1))) == "bts_lightning"
    assert model_table.source_library(model_table.build("lraspp", 64).net) == "torchvision"


def test_a_model_that_cannot_be_built_gets_a_row_saying_why(monkeypatch):
    def missing(name, image_size):
        raise ConfigError("model smp_unet needs the smp extra: pip install 'bts_lightning[smp]'")

    monkeypatch.setattr(model_table, "build", missing)
    row = model_table.measure("smp_unet", model_table.parse_args(["--models", "unet"]))
    assert row["source"].startswith("not built: model smp_unet needs the smp extra")
    assert "n/a" in model_table.markdown_table([row])


def test_unknown_model_names_are_refused():
    with pytest.raises(SystemExit):
        model_table.parse_args(["--models", "unet,no_such_net"])
