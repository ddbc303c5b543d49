"""Helpers shared by the command-line apps: clear user errors and crash-safe files."""

from __future__ import annotations

import difflib
import errno
import functools
import glob
import hashlib
import importlib.resources
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from bts_lightning.errors import BtsError, ConfigError, OutputError

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

log = logging.getLogger(__name__)

# The config tree: top-level conf/ in a checkout, bts_lightning/conf/ in an installed wheel.
CONFIG_PATH = "pkg://bts_lightning.conf"
# The same tree as a folder, for Hydra's compose API (``initialize_config_dir``) and for reading files.
CONFIG_DIR = str(importlib.resources.files("bts_lightning.conf"))

# Age after which a temporary file beside an output is a killed writer's leftover (atomic_path removes it).
STALE_SECONDS = 600
# errno values meaning the disk, the user's quota or the file-size limit is full.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _in_chain(error: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` among ``error`` and its causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def user_error_of(error: BaseException) -> BtsError | None:
    """The :class:`BtsError` behind ``error`` (Hydra's instantiate wraps exceptions), if any."""
    return _in_chain(error, BtsError)


def refused_settings(error: BaseException) -> ConfigError | None:
    """The user error behind a constructor that refused its configured values (Hydra's ``InstantiationException``
    around a ``ValueError`` or ``TypeError``: ``pos_weight=0``, ``p: 1.5``, a misspelled argument), or behind
    Lightning refusing the trainer's settings (its ``MisconfigurationException``, at construction or when fitting:
    ``trainer.accelerator=gpu`` without one, a ``limit_train_batches`` fraction below one batch), naming the class
    and its reason; ``None`` for anything else."""
    targets: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InstantiationException):
            if missing := re.match(r"Error locating target '([^']+)'", str(current)):
                key = re.search(r"full_key: (\S+)", str(current))
                lines = str(current.__cause__ or "").strip().splitlines()[1:]  # below Hydra's "Error loading 'X':"
                reason = "; ".join(line.strip() for line in lines if line.strip()) or "not found"
                return ConfigError(f"_target_: {missing[1]}{f' (at {key[1]})' if key else ''} cannot be imported: "
                                   f"{reason} Correct the class path (module.Class), or install its package.")
            targets += re.findall(r"Error in call to target '([^']+)'", str(current))[:1]
        elif (isinstance(current, MisconfigurationException)
              or isinstance(current, (ValueError, TypeError)) and (targets or _lightning_refused(current))):
            reason = "; ".join(line.strip() for line in str(current).splitlines()
                               if line.strip() and not line.strip().startswith("For further information"))
            refuser = targets[-1] if targets else "Lightning"
            lacks_device = isinstance(current, MisconfigurationException) and any(
                word in reason.lower() for word in ("accelerator", "gpu backend"))
            no_device = "; trainer=default (accelerator=auto) or trainer=cpu runs without one" if lacks_device else ""
            return ConfigError(f"{refuser} refused its settings: {reason.rstrip('.!')}. Correct the override (or "
                               f"config file) that sets it{no_device}.")
        current = current.__cause__ or current.__context__
    return None


# Trainer settings Lightning checks against the data only when fitting starts, with a plain ValueError.
FIT_TIME_SETTINGS = ("val_check_interval",)


def _lightning_refused(error: BaseException) -> bool:
    """Whether ``error`` is Lightning refusing one of :data:`FIT_TIME_SETTINGS` (e.g. a ``val_check_interval`` of more
    batches than an epoch has), raised in Lightning's own code."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}lightning{os.sep}" in frames[-1].filename and any(
        name in str(error) for name in FIT_TIME_SETTINGS)


# The shell's statuses for a process ended by SIGTERM (128 + 15) or SIGINT (128 + 2, Ctrl-C), which schedulers and
# `&&` chains read as a failure.
SIGTERM_STATUS = 143
SIGINT_STATUS = 130


# Apps (by function name) whose stopped runs resume with ``ckpt_path=last``.
RESUMABLE_APPS = ("train",)


def _stopped_by(signal_name: str, status: int, app: Callable[..., Any]) -> NoReturn:
    """Say once (stderr and the run's log files) that ``signal_name`` stopped ``app``'s run (and, for a training run,
    how to resume it), and exit with ``status``."""
    resumes = "; a training run resumes with ckpt_path=last" if getattr(app, "__name__", "") in RESUMABLE_APPS else ""
    message = f"error: stopped by {signal_name}{resumes}."
    if not is_other_rank():
        tqdm.write(message, file=sys.stderr)
    _log_to_files(message)
    raise SystemExit(status) from None


def run_app(app: Callable[..., T], *args: Any) -> T:
    """Run ``app``; a user error becomes one ``error:`` line on stderr and exit status 2; a SIGTERM or Ctrl-C
    (which Lightning catches to stop training) one ``error:`` line and :data:`SIGTERM_STATUS` or
    :data:`SIGINT_STATUS`.

    The failure also goes to the run's log files (the root logger's file handlers, e.g. Hydra's
    ``<run dir>/<app>.log``): the ``error:`` line, or the traceback of an unexpected exception,
    which is re-raised (the terminal shows each once).
    """
    try:
        return app(*args)
    except SIGTERMException:  # Lightning's: a SystemExit without a status, which would read as success
        _stopped_by("SIGTERM", SIGTERM_STATUS, app)
    except KeyboardInterrupt:
        _stopped_by("Ctrl-C (SIGINT)", SIGINT_STATUS, app)
    except SystemExit as exit_:
        if exit_.code == 1 and isinstance(exit_.__context__, KeyboardInterrupt):  # Lightning's answer to Ctrl-C
            _stopped_by("Ctrl-C (SIGINT)", SIGINT_STATUS, app)
        raise
    except Exception as error:
        user_error, refused = user_error_of(error), None
        if user_error is None:
            user_error = refused = refused_settings(error)
        if user_error is None:
            _log_to_files(f"{type(error).__name__}: {error}", error)
            raise
        if not is_other_rank():  # every DDP process checks the same settings and data: rank 0 says it once
            tqdm.write(f"error: {user_error}", file=sys.stderr)  # on a line of its own, below any progress bar
        _log_to_files(f"error: {user_error}", error if refused else None)  # a refusal's traceback: where it was made
        raise SystemExit(2) from None


def _refused_jobs_line(refused_jobs: list[str], ending: str) -> str:
    """The ``error:`` line naming a sweep's refused jobs (``#<num> (<folder>)`` each), then ``ending``."""
    return (f"error: {len(refused_jobs)} job(s) of the sweep were refused, each with its error above: "
            f"{', '.join(refused_jobs)}. {ending}")


# Where launchers put a process's rank: torchrun and Lightning's DDP subprocesses, and SLURM tasks.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_other_rank() -> bool:
    """Whether this process is a distributed rank other than 0 (any of :data:`_RANK_VARIABLES` above 0)."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in _RANK_VARIABLES)


def hydra_app(
    config_name: str,
    app: Callable[..., T],
    result: Callable[[T], Any] | None = None,
    pass_overrides: bool = False,
) -> Callable[[], Any]:
    """The command-line entry point of a Hydra app: ``main = hydra_app("train", train)``.

    ``main()`` composes ``conf/<config_name>.yaml`` with the command-line overrides, logs the config at
    DEBUG level and calls ``app(cfg)`` (``app(cfg, overrides)`` with ``pass_overrides``) through
    :func:`run_app`: a user error is one ``error:`` line and exit status 2. ``result`` maps the app's
    return value to what Hydra sweepers optimize (e.g. the best validation Dice). Overrides Hydra cannot
    compose (an unknown key or group option) keep Hydra's own message but exit with status 2 as well,
    not Hydra's 1, which is left to crashes of the app itself. In a sweep (``-m``) a job refused after another job ran
    is skipped (an Optuna trial fails) and the others run; ``main()`` then names the refused ones and exits with 2.
    """
    started = False
    finished_jobs, refused_jobs = 0, []  # of a sweep; each refused one's number and folder
    save_run_record_atomically()

    @functools.wraps(app)  # Hydra names the job (and its log file) after app's module
    def task(cfg: DictConfig) -> Any:
        nonlocal started, finished_jobs
        started = True
        log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
        hydra_config = HydraConfig.get()
        args = (cfg, list(hydra_config.overrides.task)) if pass_overrides else (cfg,)
        try:
            value = run_app(app, *args)
        except SystemExit as stop:
            if stop.code == 2:  # refused input (e.g. a resume of another network) changes nothing in the run folder
                restore_run_record()
                # A sweep goes on past a refused job once a job has run (an Optuna trial fails; main names them at the
                # end); one whose first job is refused stops, as the settings every job shares are the likely cause.
                if hydra_config.mode == RunMode.MULTIRUN and finished_jobs:
                    refused_jobs.append(f"#{hydra_config.job.num} ({hydra_config.runtime.output_dir})")
                    return None
            raise
        finally:
            _replaced_record.clear()
        finished_jobs += 1
        return result(value) if result is not None else None

    hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)

    @functools.wraps(hydra_main)
    def main() -> Any:
        unknown = (unreadable_override(sys.argv[1:]) or unknown_setting(config_name, sys.argv[1:])
                   or missing_plugin(sys.argv[1:]))
        if unknown:
            print(f"error: {unknown}", file=sys.stderr)
            raise SystemExit(2)
        try:
            try:
                value = hydra_main()
            except BaseException:  # a later job crashed or was stopped: the earlier refusals are still named
                if refused_jobs:
                    print(_refused_jobs_line(refused_jobs, "Then a later job stopped the sweep."), file=sys.stderr)
                raise
            if refused_jobs:
                print(_refused_jobs_line(refused_jobs, "The other jobs ran."), file=sys.stderr)
                raise SystemExit(2)
            return value
        except SystemExit as stop:
            if not started:  # the job's record could not be written (_save_config), or Hydra could not compose
                restore_run_record()
            if stop.code == 1 and not started:  # Hydra's exit after a config it could not compose
                raise SystemExit(2) from None
            raise

    return main


# Group options that need a Hydra plugin from an extra: (override, plugin module, extra).
PLUGIN_OPTIONS = (("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep"),
                  ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm"))


def missing_plugin(arguments: list[str]) -> str | None:
    """The error for an override whose Hydra plugin is not installed (Hydra would say it cannot find the config)."""
    for override, module, extra in PLUGIN_OPTIONS:
        if override in (argument.lstrip("+") for argument in arguments) and not _importable(module):
            return f"{override} needs the {extra} extra: pip install 'bts_lightning[{extra}]'."
    return None


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it; a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# Hydra flags that make an app compose another config than its own.
_OTHER_CONFIG_FLAGS = ("--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp")


def app_settings(config_name: str) -> set[str]:
    """The top-level keys ``conf/<config_name>.yaml`` composes to: its own keys, its defaults' groups, and the keys
    that group options written for the whole config (``# @package _global_``, e.g. ``experiment=cross_dataset``'s
    ``cross_data``) can add when chosen (:func:`option_settings`)."""
    return _own_settings(config_name) | set(option_settings(config_name))


def _own_settings(config_name: str) -> set[str]:
    """``conf/<config_name>.yaml``'s own top-level keys and its defaults' groups."""
    config = OmegaConf.load(Path(CONFIG_DIR) / f"{config_name}.yaml")
    keys = {str(key) for key in config if key != "defaults"}
    for entry in config.get("defaults") or []:
        names = entry.keys() if isinstance(entry, Mapping) else [] if entry == "_self_" else [entry]
        keys.update(str(name).removeprefix("override ").split("/")[0].split("@")[0] for name in names)
    return keys - {"_self_"}


def option_settings(config_name: str) -> dict[str, list[str]]:
    """Top-level keys that only a group option written for the whole config (``# @package _global_``) adds to
    ``conf/<config_name>.yaml``, each with the options (``experiment=cross_dataset``) that add it."""
    own = _own_settings(config_name)
    added: dict[str, list[str]] = {}
    for group in sorted(key for key in own if (Path(CONFIG_DIR) / key).is_dir()):
        for option in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
            if "@package _global_" in option.read_text().split("\n", 1)[0]:
                for key in OmegaConf.load(option):
                    if key != "defaults" and str(key) not in own:
                        added.setdefault(str(key), []).append(f"{group}={option.stem}")
    return added


def unreadable_override(arguments: list[str]) -> str | None:
    """The error for the first command-line override Hydra's grammar cannot read (a value with non-ASCII letters,
    a second ``=`` or brackets, unquoted: ``input=Ünï/a.png``, ``input=a, b=c.png``), saying how to quote it; ``None``
    when all parse (sweeps such as ``model=unet,fcn`` do)."""
    parser = OverridesParser.create()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        try:
            parser.parse_overrides([argument])
        except OverrideParseException:
            key, value = argument.split("=", 1)
            inner, outer = ('"', "'") if "'" in value else ("'", '"')
            return (f"{argument} cannot be read as an override: a value with non-ASCII letters, '=', commas, brackets or "
                    f"quotes needs quotes inside the argument, e.g. {outer}{key}={inner}{value}{inner}{outer} (the "
                    "outer ones for the shell).")
    return None


def unknown_setting(config_name: str, arguments: list[str]) -> str | None:
    """The error for the first command-line override whose top-level key ``conf/<config_name>.yaml`` does not have
    (``treshold=0.3``, or ``+treshold=0.3``, which Hydra would add and the app never read); ``None`` when all are
    known. ``hydra.*`` and forced additions (``++key=...``) pass, and everything when the command names another
    config (``--config-name``, ``--config-dir``, ``--config-path``), whose keys this cannot know."""
    if any(argument.split("=", 1)[0] in _OTHER_CONFIG_FLAGS for argument in arguments):
        return None
    known, added = app_settings(config_name) | {"hydra"}, option_settings(config_name)
    chosen = {f"{name}={value}" for name, values in (argument.lstrip("+").split("=", 1) for argument in arguments
                                                     if "=" in argument) for value in values.split(",")}
    for argument in arguments:
        if argument.startswith(("-", "++", "~")) or "=" not in argument:
            continue
        key = argument.split("=", 1)[0].removeprefix("+")
        top = key.split(".")[0].split("/")[0].split("@")[0]  # data.root, hydra/launcher=..., data@x=...
        if top in added and not chosen & set(added[top]):
            options = " or ".join(added[top])
            plus = " (and leave out the +)" if argument.startswith("+") else ""
            return (f"{argument}: {top} is a setting of {options}, which this command does not choose; add "
                    f"{added[top][0]}{plus}.")
        if top and top not in known:
            close = difflib.get_close_matches(top, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return (f"{argument}: {top} is not a setting of {config_name}{hint}. Its settings: "
                    f"{', '.join(sorted(known - {'hydra'}))}.")
        group = Path(CONFIG_DIR) / key
        if key == top and group.is_dir() and argument.split("=", 1)[1] in ("null", "None", ""):
            options = sorted(path.stem for path in group.glob("*.yaml"))
            return f"{argument}: {key} is a config group, whose value names one of its options: {', '.join(options)}."
    return None


# ------------------------------------------------------------------------------------ settings


def _shown(value: Any) -> str:
    """A setting's value as the user typed it, for error messages."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return json.dumps(value, default=str)  # "abc", true, null, ["a", "b"]


def as_path(key: str, value: Any) -> Path:
    """Setting ``key``'s ``value`` as a path: a string, or a number taken as a name (``out=2024``).

    Raises:
        ConfigError: anything else (a list, true, 1.5, an empty string), naming ``key`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ConfigError(f"{key}={_shown(value)} is not a path; give one file or folder name, e.g. {key}=DIR.")
    return Path(str(value))


def as_flag(key: str, value: Any, default: bool | None = None) -> bool:
    """Setting ``key``'s ``value`` as true or false (``tta=true``); ``default``, when given, for a null value.
    ``ConfigError`` naming both for anything else (``tta=maybe``, ``tta=1``), which ``bool()`` would take as true."""
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={_shown(value)} is not true or false; pass {key}=true or {key}=false.")
    return value


def as_number(key: str, value: Any, whole: bool = False, minimum: float | None = None) -> float | int:
    """Setting ``key``'s ``value`` as a number (``whole``: a whole number) of at least ``minimum``; ``ConfigError``
    naming both for anything else (``threshold=abc``, ``batch_size=2.5``, ``null``, ``true``)."""
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        what = "a whole number" if whole else "a number"
        raise ConfigError(f"{key}={_shown(value)} is not {what}; pass {key}=N with N {what}"
                          f"{'' if minimum is None else f' >= {minimum:g}'}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum:g}.")
    return value


def number_setting(cfg: DictConfig, key: str, default: float, whole: bool = False,
                   minimum: float | None = None) -> float | int:
    """Setting ``key`` (dotted) of an app's config as :func:`as_number`; ``default`` when it is absent."""
    value = OmegaConf.select(cfg, key, default=default)
    return as_number(key, value, whole, minimum)


def flag_setting(cfg: DictConfig, key: str, default: bool) -> bool:
    """Setting ``key`` (dotted) of an app's config as :func:`as_flag`; ``default`` when it is absent or null."""
    return as_flag(key, OmegaConf.select(cfg, key), default)


def path_setting(cfg: DictConfig, key: str, required: str | None = None) -> Path | None:
    """Setting ``key`` of an app's config as a path (:func:`as_path`); None when it is null.

    ``required``: an example command; when given, a null (or empty) setting is a ConfigError naming
    ``key`` and showing the example.
    """
    value = OmegaConf.select(cfg, key)
    if value is None or value == "":
        if required:
            raise ConfigError(f"{key} is required: {required}")
        return None
    return as_path(key, value)


def _log_to_files(message: str, error: BaseException | None = None) -> None:
    """Log ``message`` (with ``error``'s traceback) at ERROR level to the root logger's file handlers only."""
    exc_info = (type(error), error, error.__traceback__) if error is not None else None
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


# ------------------------------------------------------------------------------------- output files


def _advice(error: OSError) -> str:
    if error.errno in _NO_SPACE:
        return "free some disk space or write to another disk"
    return "choose a writable folder"


def output_error(path: str | Path, error: OSError) -> OutputError:
    """The user error for OS ``error`` while writing ``path``: what failed and what to do."""
    return OutputError(f"Could not write {path}: {error.strerror or error}; {_advice(error)}.")


def make_directory(path: str | Path, setting: str | None = None) -> Path:
    """Create folder ``path`` and its parents; returns it.

    Raises:
        OutputError: it cannot be created (a file in the way, not writable, full disk); the
            message names it and, when given, the ``setting`` that chose it (e.g. ``hydra.run.dir``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking_file = next((p for p in (path, *path.parents) if p.is_file()), None)
        reason = f"{blocking_file} is a file" if blocking_file else error.strerror or str(error)
        named = f" ({setting})" if setting else ""
        raise OutputError(f"Cannot create folder {path}{named}: {reason}; {_advice(error)}.") from error
    return path


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.NAME.*.tmp`` files beside ``path`` not modified for :data:`STALE_SECONDS` (a SIGKILL's leftovers;
    a write in progress elsewhere keeps its file fresh)."""
    now = time.time()
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with suppress(OSError):
            if now - leftover.stat().st_mtime > STALE_SECONDS:
                leftover.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (hidden ``.NAME.XXXX.tmp``) for the block to write.

    When the block succeeds, the file is flushed to disk, made readable by all (0o644) and renamed
    onto ``path`` in one step: ``path`` always holds its previous content or the complete new one,
    whatever happens (crash, SIGKILL, full disk). On any exception, KeyboardInterrupt included, the
    temporary file is removed and ``path`` left as it was. The parent folder is created if needed. Temporary files of
    ``path`` left by a killed process (untouched for :data:`STALE_SECONDS`) are removed first.

    Raises:
        OutputError: an OS error (full disk, folder not writable, ...) in the block or while
            finishing, also when wrapped (e.g. the RuntimeError of ``torch.save``); it names ``path``.
    """
    path = Path(path)
    make_directory(path.parent)
    _remove_stale_temporaries(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise output_error(path, error) from error
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        _fsync(temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException as error:
        with suppress(OSError):
            temporary.unlink(missing_ok=True)
        cause = _in_chain(error, OSError) if isinstance(error, Exception) and user_error_of(error) is None else None
        if cause is not None:
            raise output_error(path, cause) from error
        raise
    with suppress(OSError):  # make the rename itself durable; some filesystems cannot sync folders
        _fsync(path.parent)


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path` (all or nothing; OutputError on OS errors)."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def first_missing_folder(path: str | Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what creating ``path`` adds, and
    what a failed first write into it removes again. None when ``path`` exists."""
    path = Path(path).absolute()
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def write_staged(staged: ExitStack, path: str | Path, data: bytes = b"") -> Path:
    """Write ``data`` (synced) to a temporary file beside ``path`` that takes its place when ``staged`` closes
    without an error (:func:`atomic_path` entered on ``staged``); returns the temporary file, to rewrite if needed.
    Files staged on one stack take their places back to back, the last staged first."""
    temporary = staged.enter_context(atomic_path(path))
    temporary.write_bytes(data)
    _fsync(temporary)
    return temporary


def write_files_together(directory: str | Path, files: Mapping[str, bytes], setting: str = "output") -> Path:
    """Write ``files`` (name relative to ``directory`` -> bytes) so that a failure leaves the folder as it was.

    Every file is first written and synced beside its place (:func:`atomic_path`); only then are they renamed, in
    ``files``' order and back to back, so a failed or killed write (a full disk, SIGKILL before the renames) changes
    nothing, and only a kill in the instant of the renames can leave some files new and the rest old (name the file
    that tells, e.g. a hub folder's ``config.json``, last). A failed first write removes the folders it made.
    """
    created = first_missing_folder(directory)
    try:
        directory = make_directory(directory, setting)
        with ExitStack() as staged:
            for name, data in reversed(list(files.items())):  # the stack renames the last entered first
                write_staged(staged, directory / name, data)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return Path(directory)


def json_bytes(data: Any) -> bytes:
    """``data`` as the project's JSON files hold it: indented, keys sorted, a final newline."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON through :func:`atomic_path`: readers never see a partial file."""
    write_bytes_atomic(path, json_bytes(data))


# Run-record files (Hydra's ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``) that this job replaced, with
# their previous content: put back when the app refuses its input, e.g. a ``ckpt_path=last`` resume of another network
# in the run's own folder, whose record would otherwise name the refused settings.
_replaced_record: dict[Path, bytes] = {}


def _save_config(cfg: DictConfig, filename: str, output_dir: Path) -> None:
    """Hydra's ``hydra.core.utils._save_config`` through :func:`write_bytes_atomic`, remembering the file it replaces.

    A full disk or unwritable folder is one ``error:`` line and exit status 2 (Hydra's own was a traceback that
    left the file truncated)."""
    path = Path(output_dir) / filename

    def save() -> None:
        if path.is_file():
            _replaced_record.setdefault(path, path.read_bytes())
        write_bytes_atomic(path, OmegaConf.to_yaml(cfg).encode())

    run_app(save)


def save_run_record_atomically() -> None:
    """Make Hydra write each job's ``.hydra/*.yaml`` with :func:`_save_config` (``run_job`` looks the name up in
    ``hydra.core.utils`` at call time)."""
    import hydra.core.utils

    hydra.core.utils._save_config = _save_config


def keep_run_record() -> None:
    """Make this job's run record final (e.g. once training starts): a later refusal no longer puts the previous
    one back, since the run folder then holds what this job did."""
    _replaced_record.clear()


def restore_run_record() -> None:
    """Put back the run-record files this job replaced (see :data:`_replaced_record`)."""
    for path, previous in _replaced_record.items():
        with suppress(BtsError):
            write_bytes_atomic(path, previous)


class CreateRunDirectory(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): create the run or sweep directory first.

    Hydra creates it itself, and reports a failure (a file in the way, no permission) with a
    traceback and exit status 1; here it is one ``error:`` line naming the directory, exit status 2.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_app(make_directory, config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_app(make_directory, config.hydra.sweep.dir, "hydra.sweep.dir")
