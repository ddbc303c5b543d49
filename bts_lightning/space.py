"""The Hugging Face Space bundle of a model: ``python -m bts_lightning.export ckpt_path=CKPT format=space output=DIR``.

``DIR`` gets ``app.py`` (:mod:`bts_lightning.space_app`: Gradio + onnxruntime, no PyTorch),
``requirements.txt`` (onnxruntime, gradio, opencv, numpy; no torch), ``README.md`` (the Space front
matter ``sdk: gradio``, ``sdk_version``, ``app_file`` over the model card), ``model.onnx`` (with its
contract) and ``examples/`` (synthetic slices with the channels the model reads). Upload the folder as a Space to serve the page.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bts_lightning.demo import example_slices
from bts_lightning.errors import ConfigError
from bts_lightning.export import export_model
from bts_lightning.hub import check_upload_folder, hub_config, model_card
from bts_lightning.inference import ModelContract
from bts_lightning.runtime import write_files_together

# What write_space puts in its folder; anything else there would be uploaded with it.
BUNDLE_FILES = ("app.py", "requirements.txt", "README.md", "model.onnx", "examples")
REQUIREMENTS = ("onnxruntime>=1.18", "opencv-python-headless>=4.8", "numpy>=1.24")


def gradio_version() -> str:
    """The installed gradio's version (the Space's ``sdk_version``); ConfigError with the install hint without it."""
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("The Space bundle pins the installed gradio: pip install 'bts_lightning[demo]'") from None


def write_space(module: nn.Module, output: str | Path, contract: ModelContract, image_size: int,
                metrics: Mapping[str, Any] | None = None, check: Callable[[Path], None] | None = None,
                **onnx: Any) -> Path:
    """Write the Space bundle of ``module`` (trained under ``contract``) into folder ``output``; returns it.

    ``check``: called with the staged ``model.onnx`` before any file takes its place; what it raises leaves the folder
    as it was. ``onnx``: ``opset`` and ``onnx_exporter`` for :func:`~bts_lightning.export.export_model`.
    """
    version = gradio_version()
    check_upload_folder(output, BUNDLE_FILES, "Space")
    output = Path(output)
    app = importlib.resources.files("bts_lightning").joinpath("space_app.py").read_bytes()
    front = ("title: Brain tumor segmentation", "sdk: gradio", f"sdk_version: {version}", "app_file: app.py",
             "pinned: false", "tags:", "- image-segmentation", "- medical-imaging")
    card = model_card(hub_config(module, contract), metrics, front)
    with tempfile.TemporaryDirectory() as scratch:
        model = export_model(module, Path(scratch) / "model.onnx", "onnx", image_size, contract=contract, **onnx)
        if check is not None:
            check(model)
        files = {"model.onnx": model.read_bytes(), "app.py": app,
                 "requirements.txt": "\n".join([*REQUIREMENTS, f"gradio=={version}", ""]).encode(),
                 "README.md": card.replace("ckpt_path=THIS_FOLDER", "ckpt_path=model.onnx").encode(),
                 **{f"examples/{path.name}": path.read_bytes()
                    for path in example_slices(Path(scratch), 3, contract.channel_indices)}}
    # The model card, which describes model.onnx, takes its place last.
    card = files.pop("README.md")
    return write_files_together(output, {**files, "README.md": card})
