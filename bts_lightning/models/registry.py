"""Name -> builder registry for segmentation models."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from bts_lightning.errors import ConfigError
from bts_lightning.models.presence import PresenceGated

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {}
# Names of the registered models that have no pretrained weights.
NOT_PRETRAINED: set[str] = set()


def register_model(name: str, pretrained: bool = True) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder ``f(in_channels, num_classes, weights, **kwargs)`` under ``name``.

    ``pretrained=False``: the model has no pretrained weights; its builder calls :func:`reject_weights`.
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        if not pretrained:
            NOT_PRETRAINED.add(name)
        return builder

    return decorator


def available_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(MODELS)


def reject_weights(name: str, weights: str | None) -> None:
    """Raise ``ConfigError`` unless ``weights`` is None: model ``name`` has no pretrained weights."""
    if weights is not None:
        raise ConfigError(
            f"Model {name!r} has no pretrained weights (got model.net.weights={weights!r}); pretrained weights "
            f"exist only for {', '.join(sorted(set(MODELS) - NOT_PRETRAINED))}. Use model.net.weights=null."
        )


def build_model(
    name: str,
    in_channels: int = 1,
    num_classes: int = 2,
    weights: str | None = None,
    presence_gate: bool = False,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name``; its ``forward(x)`` returns ``{"out": logits[, "aux": logits or [logits, ...]]}``.

    ``aux`` (auxiliary heads, deep supervision) is for the training loss only; a network may leave it
    out in eval mode. Every logits tensor is (N, num_classes, H, W) at input resolution.
    ``presence_gate`` (binary models only): the network gets one more output channel, a slice-level
    "tumor present" map, and is wrapped in :class:`~bts_lightning.models.presence.PresenceGated`,
    whose 2-class logits are min(P(pixel is tumor | the slice has one), P(the slice has a tumor)).

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
    if presence_gate not in (True, False):
        raise ConfigError(f"model.net.presence_gate={presence_gate!r} must be true or false.")
    if presence_gate and num_classes != 2:
        raise ConfigError(f"model.net.presence_gate=true needs a binary model (num_classes=2), got num_classes={num_classes}.")
    builder = MODELS[name]
    outputs = num_classes + 1 if presence_gate else num_classes
    try:
        inspect.signature(builder).bind(in_channels, outputs, weights, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"Invalid options for model {name!r}: {exc}.") from None
    net = builder(in_channels, outputs, weights, **kwargs)
    return PresenceGated(net) if presence_gate else net


def check_input_size(model: nn.Module, size: int, key: str) -> None:
    """Raise ``ConfigError`` naming ``key`` when ``model`` cannot take ``size`` x ``size`` inputs.

    A network that needs H and W divisible by some number says so with a ``size_multiple``
    attribute (U-Net: the product of its strides) and explains it with ``size_rule`` (naming the
    options that set it); other networks take any size.
    """
    multiple = int(getattr(model, "size_multiple", 1))
    if size % multiple:
        lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
        choices = f"{lower} or {upper}" if lower > 0 else str(upper)
        rule = getattr(model, "size_rule", f"H and W divisible by {multiple}")
        raise ConfigError(f"{key}={size} is not a multiple of {multiple}, which this network needs ({rule}); "
                          f"use {key}={choices}.")


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The pretrainable backbone of ``model`` (to freeze it), or None if it has none."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else None
