"""A copy of a scan-layout dataset whose slices carry their scan neighbours as channels (2.5D input).

``python -m benchmarks.neighbour_channels SOURCE OUT [--channel 1]``: for every slice of every scan folder of
SOURCE (the LGG layout: ``<scan>/<scan>_<n>.tif`` beside ``<scan>_<n>_mask.tif``; a scan is a folder, a slice's
number the one its name ends with, as :mod:`bts_lightning.scan_context` reads them), OUT gets a 3-channel
image of the same name holding ``--channel`` (FLAIR of the LGG files by default) of slices ``n - 1``, ``n`` and
``n + 1`` in file order (an end slice repeats its own for the missing neighbour), and the mask as it is. Other
files (``data.csv``) are copied. Train on it with ``data.root=OUT data.channels=[0,1,2]``; ``data.channels=[1]``
is the source's ``--channel`` alone, so both networks of one experiment read the same folder.

OUT is written in ``OUT.partial`` and renamed when complete (removed on failure); an existing OUT is refused, never
overwritten.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from bts_lightning.data.io import ChannelError, UnreadableImageError, read_channels
from bts_lightning.scan_context import slice_position

MASK_SUFFIX = "_mask"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def neighbour_stack(planes: dict[int, np.ndarray], number: int) -> np.ndarray:
    """(H, W, 3): the planes of slices ``number - 1``, ``number``, ``number + 1``; a missing one is ``number``'s."""
    return np.stack([planes.get(number + step, planes[number]) for step in (-1, 0, 1)], axis=-1)


def write_scan(scan: Path, out: Path, channel: int) -> int:
    """Write the neighbour-channel copy of one scan folder into ``out``; returns how many slices it holds."""
    images = [path for path in scan.iterdir()
              if path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.endswith(MASK_SUFFIX)]
    numbered = {}
    for path in images:
        position = slice_position(path)
        if position is None:
            raise SystemExit(f"error: {path} has no slice number at the end of its name (<scan>_<n>{path.suffix}).")
        numbered[position[1]] = path
    try:
        planes = {number: read_channels(path, (channel,))[0] for number, path in numbered.items()}
    except (ChannelError, UnreadableImageError) as error:
        raise SystemExit(f"error: {scan}: {error}; choose --channel below the images' channel count.") from None
    out.mkdir(parents=True)
    for number, path in numbered.items():
        mask = path.with_name(f"{path.stem}{MASK_SUFFIX}{path.suffix}")
        if not mask.is_file():
            raise SystemExit(f"error: {path} has no mask {mask.name} beside it.")
        stack = neighbour_stack(planes, number)[..., ::-1]  # file order -> OpenCV's BGR
        if not cv2.imwrite(str(out / path.name), np.ascontiguousarray(stack)):
            raise SystemExit(f"error: could not write {out / path.name}.")
        shutil.copy2(mask, out / mask.name)
    return len(numbered)


def write_copy(source: Path, out: Path, channel: int) -> int:
    """The neighbour-channel copy of ``source`` (its subfolders are scans) as ``out``; returns the slice count."""
    if out.exists():
        raise SystemExit(f"error: {out} exists; give a new folder (nothing there is overwritten).")
    if not source.is_dir():
        raise SystemExit(f"error: {source} is not a folder of scan folders (e.g. the LGG set's root).")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    count = 0
    try:
        for folder, subfolders, files in os.walk(source):
            folder = Path(folder)
            subfolders.sort()
            target = partial / folder.relative_to(source)
            if any(name.lower().endswith(IMAGE_SUFFIXES) for name in files):
                count += write_scan(folder, target, channel)
            else:
                target.mkdir(parents=True, exist_ok=True)
                for name in files:
                    shutil.copy2(folder / name, target / name)
        if not count:
            raise SystemExit(f"error: no slice image ({', '.join(IMAGE_SUFFIXES)}) under {source}.")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, out)
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="dataset root in a scan layout (e.g. ../shared/data/lgg-sample)")
    parser.add_argument("out", type=Path, help="new folder for the copy")
    parser.add_argument("--channel", type=int, default=1, help="file channel stacked (default 1: LGG FLAIR)")
    args = parser.parse_args(argv)
    count = write_copy(args.source, args.out, args.channel)
    print(f"{count} slices with their scan neighbours as channels in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
