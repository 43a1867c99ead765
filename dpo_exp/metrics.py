"""Metrics as (sum, count) pairs, so a mean stays exact however the values are split.

A step's data is cut into micro-batches, a held-out set into batches, a run's work into ranks: each part
adds the sum of its values and how many there were, and the mean is taken once, over the whole. A leaf
module: it imports nothing of dpo_exp (dpo_exp.distributed adds up every rank's MetricSums).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Union

import torch

Metric = tuple[torch.Tensor, float]  # (sum of values, how many values), as an algorithm's step returns it


def mean_metric(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Metric:
    """A metric averaged per element (per pair, or per token under `mask`) however the step is split."""
    values = values.detach().float()
    if mask is None:
        return values.sum(), float(values.numel())
    mask = mask.to(values.dtype)
    return (values * mask).sum(), float(mask.sum().item())


class MetricSums:
    """Named [sum, count] pairs in the order they were first added; `means` is sum / count of each."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, total: Union[float, torch.Tensor], count: float) -> None:
        """Add `total` (a number or a 0-d tensor) to the metric's sum and `count` to its count."""
        acc = self._sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(total)
        acc[1] += count

    def merge(self, other: Union["MetricSums", Mapping[str, tuple]]) -> "MetricSums":
        """Add every (sum, count) of `other` (another MetricSums, or a step's {name: Metric}); returns self."""
        for name, (total, count) in other.items():
            self.add(name, total, count)
        return self

    @classmethod
    def total(cls, parts: Iterable["MetricSums"]) -> "MetricSums":
        """The parts added up, in order (e.g. every rank's, in rank order)."""
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def set_count(self, name: str, count: float) -> None:
        self._sums[name][1] = count

    def means(self) -> dict[str, float]:
        """sum / count of every metric that counted anything."""
        return {name: total / count for name, (total, count) in self._sums.items() if count}

    def items(self) -> Iterator[tuple[str, tuple[float, float]]]:
        return ((name, (total, count)) for name, (total, count) in self._sums.items())

    def __getitem__(self, name: str) -> tuple[float, float]:
        total, count = self._sums[name]
        return total, count

    def __contains__(self, name: str) -> bool:
        return name in self._sums

    def __len__(self) -> int:
        return len(self._sums)
