"""The command line every run-folder table of ``benchmarks/`` shares: ``python -m benchmarks.X OUT [--out FILE]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from bts_lightning.runtime import write_bytes_atomic


def table_main(table: Callable[[Path], str], doc: str, script: str, argv: Sequence[str] | None = None) -> None:
    """Print ``table(OUT)`` (Markdown) for the ``OUT`` folder of ``script``; with ``--out FILE`` also write it there,
    atomically. ``doc``: the module docstring, whose first line is the description."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("runs", type=Path, help=f"the OUT folder of {script}")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    text = table(args.runs)
    print(text, end="")
    if args.out:
        write_bytes_atomic(args.out, text.encode())
