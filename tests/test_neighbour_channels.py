"""benchmarks/neighbour_channels.py: each slice's channel stacked with its scan neighbours', on hand-made scans."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from benchmarks.neighbour_channels import main
from bts_lightning.data.io import read_channels, read_grayscale


def _scan(root, name: str, values: list[int]) -> None:
    """A scan folder of slices ``<name>_1 ...`` whose file channel 1 is ``values[i]`` (channels 0 and 2 differ)."""
    folder = root / "kaggle_3m" / name
    folder.mkdir(parents=True)
    for number, value in enumerate(values, start=1):
        rgb = np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), value, np.uint8),
                        np.full((8, 8), 7, np.uint8)], axis=-1)
        cv2.imwrite(str(folder / f"{name}_{number}.tif"), rgb[..., ::-1])
        mask = np.zeros((8, 8), np.uint8)
        mask[:number, :] = 255
        cv2.imwrite(str(folder / f"{name}_{number}_mask.tif"), mask)


def test_slices_carry_their_neighbours_and_masks_are_kept(tmp_path):
    source = tmp_path / "source"
    _scan(source, "A", [10, 20, 30])
    _scan(source, "B", [90])  # a one-slice scan: its own plane three times
    (source / "kaggle_3m" / "data.csv").write_text("Patient\nA\n")
    out = tmp_path / "out"
    main([str(source), str(out)])
    planes = lambda name, n: read_channels(out / "kaggle_3m" / name / f"{name}_{n}.tif", (0, 1, 2))[:, 0, 0].tolist()
    assert [planes("A", n) for n in (1, 2, 3)] == [[10, 10, 20], [10, 20, 30], [20, 30, 30]]
    assert planes("B", 1) == [90, 90, 90]
    for n in (1, 2, 3):
        mask = read_grayscale(out / "kaggle_3m" / "A" / f"A_{n}_mask.tif")
        assert (mask == read_grayscale(source / "kaggle_3m" / "A" / f"A_{n}_mask.tif")).all() and mask.sum() == 255 * 8 * n
    assert (out / "kaggle_3m" / "data.csv").read_text() == "Patient\nA\n"
    assert not (tmp_path / "out.partial").exists()
    with pytest.raises(SystemExit, match="exists"):
        main([str(source), str(out)])  # never written over
    with pytest.raises(SystemExit, match="choose --channel below"):
        main([str(source), str(tmp_path / "other"), "--channel", "3"])
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()
