"""User-facing errors: one clear message, no traceback wall, non-zero exit."""

from __future__ import annotations


class BtsError(Exception):
    """Base class for errors caused by user input (data, config, files, weights)."""


class DataError(BtsError):
    """The dataset on disk is missing, incomplete or inconsistent."""


class ConfigError(BtsError):
    """A configuration value is invalid."""


class WeightsUnavailableError(BtsError):
    """Pretrained weights are neither cached nor downloadable."""


class OutputError(BtsError):
    """An output file or folder cannot be written (full disk, folder not writable, path under a file)."""


def format_names(names: list[str], limit: int = 10) -> str:
    """Join file names for an error message, eliding after ``limit`` entries."""
    shown = ", ".join(str(name) for name in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``str(error)``, at most ``limit`` characters (the error's type name when empty)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
