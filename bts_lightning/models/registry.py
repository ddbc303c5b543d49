"""Name -> builder registry for segmentation models."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from bts_lightning.errors import ConfigError

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder ``f(in_channels, num_classes, weights, **kwargs)`` under ``name``."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(MODELS)


def build_model(
    name: str,
    in_channels: int = 1,
    num_classes: int = 2,
    weights: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name``; its ``forward(x)`` returns ``{"out": logits[, "aux": logits]}``.

    Raises ``ConfigError`` for an unknown name, bad sizes or options the builder does not take.
    """
    if name not in MODELS:
        raise ConfigError(
            f"Unknown model {name!r}. Available models: {', '.join(available_models())}."
        )
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(
            f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}."
        )
    builder = MODELS[name]
    try:
        inspect.signature(builder).bind(in_channels, num_classes, weights, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"Invalid options for model {name!r}: {exc}.") from None
    return builder(in_channels, num_classes, weights, **kwargs)


def check_input_size(model: nn.Module, size: int, key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` when ``model`` cannot take ``size`` x ``size`` inputs.

    A network that needs H and W divisible by some number says so with a ``size_multiple``
    attribute (U-Net: the product of its strides); other networks take any size.
    """
    multiple = int(getattr(model, "size_multiple", 1))
    if size % multiple:
        lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
        choices = f"{lower} or {upper}" if lower > 0 else str(upper)
        raise ConfigError(
            f"{key}={size} is not a multiple of {multiple}, which this network needs (U-Net: the product of "
            f"model.net.strides); use {key}={choices}, or change model.net.strides."
        )


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The pretrainable backbone of ``model`` (to freeze it), or None if it has none."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else None
