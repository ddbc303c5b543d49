"""``device=``: the apps' device names, checked before any model or file is loaded."""

from __future__ import annotations

import pytest
import torch

from bts_lightning.errors import ConfigError
from bts_lightning.inference import resolve_device


def test_auto_and_cpu_need_no_accelerator():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "device='gpu' is not a device name (use auto, cpu, cuda or cuda:N)"),
    ("meta", "device=meta is not supported: use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:1", "device=cuda:1 was asked for but this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
])
def test_a_device_this_machine_cannot_run_is_named(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(device)


def test_an_accelerator_that_is_absent_is_named_not_blamed_on_the_checkpoint(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda was asked for but CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"device=mps was asked for but MPS \(Apple GPUs\) is not available here"):
        resolve_device("mps")
