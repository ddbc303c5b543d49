"""Loss combinations built from MONAI losses in YAML (``loss=dice_focal``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class WeightedLossSum(nn.Module):
    """``sum(weights[name] * terms[name](input, target))`` over named loss terms.

    Every term receives the same (N, C, H, W) logits and (N, 1, H, W) labels, so each term's own
    activation and background options decide what it sees. Weights default to 1.
    """

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedLossSum needs at least one loss term")
        self.terms = nn.ModuleDict(dict(terms))
        weights = dict(weights or {})
        if unknown := sorted(set(weights) - set(terms)):
            raise ValueError(f"weights name unknown loss terms {unknown}; terms are {sorted(terms)}")
        self.weights = {name: float(weights.get(name, 1.0)) for name in terms}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.weights[name] * term(input, target) for name, term in self.terms.items())
