"""Helpers shared by the command-line apps: clear user errors and crash-safe files."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bts_lightning.errors import BtsError

T = TypeVar("T")


def user_error_of(error: BaseException) -> BtsError | None:
    """The :class:`BtsError` behind ``error`` (Hydra's instantiate wraps exceptions), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, BtsError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def run_app(app: Callable[..., T], *args: Any) -> T:
    """Run ``app``; a user error becomes one ``error:`` line on stderr and exit status 2."""
    try:
        return app(*args)
    except Exception as error:
        user_error = user_error_of(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
