"""Input baselines: quantile bins and moments per feature, the population stability index,
and reading a baseline sample without unpickling anything but tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from modelyard.baseline import (
    MAX_FEATURES,
    compute_baseline,
    load_baseline_sample,
    population_stability_index,
)
from modelyard.errors import InvalidArgument
from modelyard.v1 import tensor_pb2

FP32 = tensor_pb2.DATA_TYPE_FP32


def signature(*names: str) -> tensor_pb2.Signature:
    return tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name=n, data_type=FP32, shape=[-1, 4]) for n in names],
        outputs=[tensor_pb2.TensorSpec(name="y", data_type=FP32, shape=[-1, 1])],
    )


def test_a_baseline_has_moments_and_decile_bins_per_feature() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, 3, generator=generator) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor(
        [0.0, 5.0, -1.0]
    )
    (baseline,) = compute_baseline({"x": x})
    assert baseline.input == "x" and baseline.item_count == 10_000 and len(baseline.features) == 3
    for feature, (mean, std) in zip(baseline.features, [(0.0, 1.0), (5.0, 2.0), (-1.0, 0.5)], strict=True):
        assert feature.mean == pytest.approx(mean, abs=0.05) and feature.std == pytest.approx(std, rel=0.03)
        assert len(feature.bin_edges) == 9 and list(feature.bin_edges) == sorted(feature.bin_edges)
        assert len(feature.bin_fractions) == 10 and sum(feature.bin_fractions) == pytest.approx(1.0)
        assert all(f == pytest.approx(0.1, abs=0.002) for f in feature.bin_fractions)
    # The median edge of a normal feature sits at its mean.
    assert baseline.features[1].bin_edges[4] == pytest.approx(5.0, abs=0.1)


def test_discrete_features_get_their_values_as_edges_and_only_32_columns_are_described() -> None:
    flags = torch.tensor([[0.0], [1.0], [1.0], [1.0]])
    (baseline,) = compute_baseline({"flag": flags})
    (feature,) = baseline.features
    assert list(feature.bin_edges) == [0.0, 1.0]  # coinciding quantiles merged
    assert list(feature.bin_fractions) == [0.25, 0.75, 0.0]

    (wide,) = compute_baseline({"image": torch.rand(50, 3, 8, 8)})
    assert len(wide.features) == MAX_FEATURES  # [items, 192] flattened, the first 32 columns


def test_samples_that_cannot_be_described_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="NaN or infinite"):
        compute_baseline({"x": torch.tensor([[1.0], [math.nan]])})
    with pytest.raises(InvalidArgument, match="items on dim 0"):
        compute_baseline({"x": torch.tensor(3.0)})
    with pytest.raises(InvalidArgument, match="bins"):
        compute_baseline({"x": torch.ones(4, 1)}, bins=1)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    expected = [0.1] * 10
    assert population_stability_index(expected, [100] * 10) == pytest.approx(0.0)
    # Counts or fractions: both sides are normalised.
    assert population_stability_index(expected, [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]) == pytest.approx(
        0.0
    )
    moderate = population_stability_index(expected, [5, 5, 8, 8, 10, 10, 12, 12, 15, 15])
    assert 0.05 < moderate < 0.25
    # Everything in the last bin: an empty bin is floored, so the index is large but finite.
    assert population_stability_index(expected, [0] * 9 + [100]) > 2.0
    assert math.isnan(population_stability_index(expected, [1, 2]))
    assert math.isnan(population_stability_index(expected, [0] * 10))


def test_a_baseline_sample_is_read_as_tensors_only(tmp_path: Path) -> None:
    both = tmp_path / "both.pt"
    torch.save({"a": torch.ones(3, 4), "b": torch.zeros(3, 4)}, both)
    assert set(load_baseline_sample(both, signature("a", "b"))) == {"a", "b"}

    single = tmp_path / "single.pt"
    torch.save(torch.ones(3, 4), single)
    assert set(load_baseline_sample(single, signature("a"))) == {"a"}
    with pytest.raises(InvalidArgument, match="one tensor but the model takes 2 inputs"):
        load_baseline_sample(single, signature("a", "b"))

    unknown = tmp_path / "unknown.pt"
    torch.save({"c": torch.ones(3, 4)}, unknown)
    with pytest.raises(InvalidArgument, match="input\\(s\\) c"):
        load_baseline_sample(unknown, signature("a"))

    # A pickle of anything but tensors is refused by weights_only, not executed.
    pickled = tmp_path / "pickled.pt"
    torch.save({"a": Path("/etc/passwd")}, pickled)
    with pytest.raises(InvalidArgument, match="not a torch.save'd tensor"):
        load_baseline_sample(pickled, signature("a"))
