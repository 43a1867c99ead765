"""(sum, count) metrics: a mean over parts is the mean over their union, however the values were split."""
import pytest
import torch

from dpo_exp import distributed
from dpo_exp.metrics import MetricSums, mean_metric


def test_merged_parts_give_the_mean_of_every_value():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    first, second = MetricSums(), MetricSums()
    first.add("x", *mean_metric(values[:2]))
    second.add("x", *mean_metric(values[2:]))
    second.add("y", 6.0, 3)
    merged = MetricSums().merge(first).merge(second)
    assert merged["x"] == (20.0, 5.0) and merged.means() == {"x": 4.0, "y": 2.0}
    assert list(MetricSums.total([second, first]).means()) == ["x", "y"]  # first added, first listed
    assert first.means() == {"x": 1.5}  # merging adds into the receiver only


def test_a_step_output_merges_and_a_metric_that_counted_nothing_has_no_mean():
    tokens = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    sums = MetricSums()
    sums.merge({"per_token": mean_metric(tokens, mask=torch.tensor([[True, False], [True, True]])),
                "empty": mean_metric(torch.tensor([]))})
    assert sums.means() == {"per_token": pytest.approx(3.0)}
    sums.set_count("per_token", 1.0)  # e.g. a loss already divided by the step's normaliser
    assert sums.means()["per_token"] == pytest.approx(9.0)


def test_one_process_reduces_to_itself():
    sums = MetricSums()
    sums.add("x", 1.0, 2)
    assert distributed.reduce_metrics(sums) is sums
