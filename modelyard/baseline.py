"""Input baselines: the reference distribution of a model's inputs, recorded at registration.

A baseline describes each input feature (a column of the input flattened to
`[items, features]`, the first `MAX_FEATURES` only, as the model servers export them) by its
mean and standard deviation, and by quantile bins: inner bin edges and the fraction of the
sample in each bin. The monitor compares sampled traffic with it: a chi-square test of the bin
counts per feature (`input_drift_p`), the standardised mean shift (`input_drift`) and the
population stability index per feature (`input_psi`).

Bin convention, shared by the baseline, the model servers' counters and the monitor (it is
`torch.searchsorted(edges, values, side="left")`): with inner edges `e[0] <= ... <= e[k-1]`,
bin 0 holds `v <= e[0]`, bin i holds `e[i-1] < v <= e[i]`, bin k holds `v > e[k-1]`.

Usage::

    sample = load_baseline_sample("sample.pt", signature)   # name -> tensor, weights_only
    baselines = compute_baseline(sample)                    # list[registry_pb2.InputBaseline]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modelyard.errors import InvalidArgument
from modelyard.v1 import registry_pb2, tensor_pb2

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the registry and the monitor use the
# constants, the checks and the PSI without paying for loading torch.

__all__ = [
    "DEFAULT_BINS",
    "MAX_BIN_EDGES",
    "MAX_FEATURES",
    "PSI_FLOOR",
    "PSI_SMOOTHING",
    "compute_baseline",
    "feature_matrix",
    "load_baseline_sample",
    "population_stability_index",
]

MAX_FEATURES = 32
"""Columns per input that are described (the model servers export the same ones)."""

DEFAULT_BINS = 10
"""Quantile bins per feature (deciles)."""

MAX_BIN_EDGES = 63
"""The most inner edges a feature may carry (bounds the model servers' counter series)."""

PSI_SMOOTHING = 0.5
"""Items added to every bin before the PSI takes fractions (Jeffreys' add-one-half), so one
empty bin in a small window does not dominate the index."""

PSI_FLOOR = 1e-4
"""The least fraction a bin of a baseline of unknown size counts for in the PSI (its
logarithm must stay finite)."""


def feature_matrix(tensor: torch.Tensor) -> torch.Tensor | None:
    """The first `MAX_FEATURES` columns of `tensor` flattened to `[items, features]`, float64;
    None for a tensor that has no features to describe (scalar, empty, not numeric)."""
    import torch

    if not (
        tensor.is_floating_point()
        or tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    ):
        return None
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        return None
    rows = tensor.reshape(tensor.shape[0], -1)[:, :MAX_FEATURES].to(torch.float64)
    return rows if rows.shape[1] > 0 else None


def compute_baseline(
    sample: Mapping[str, torch.Tensor], *, bins: int = DEFAULT_BINS
) -> list[registry_pb2.InputBaseline]:
    """Describe every input of a sample: count, mean, std and quantile bins per feature.

    Args:
        sample: Input name -> tensor of items (dim 0), e.g. a slice of the training set.
        bins: Quantile bins per feature; edges that coincide (discrete or constant features)
            are merged, so a feature may get fewer.

    Returns:
        One `InputBaseline` per input that has features, sorted by input name.

    Raises:
        InvalidArgument: `bins` is out of range, or an input has no usable values (not
            numeric, no items, or NaN / infinite values).
    """
    import torch

    if not 2 <= bins <= MAX_BIN_EDGES + 1:
        raise InvalidArgument(f"bins must be from 2 to {MAX_BIN_EDGES + 1}, not {bins}", field="bins")
    out = []
    for name in sorted(sample):
        rows = feature_matrix(sample[name])
        if rows is None:
            raise InvalidArgument(
                f"input {name!r}: a baseline needs a numeric tensor with items on dim 0, got "
                f"{sample[name].dtype} of shape {list(sample[name].shape)}",
                field=name,
            )
        if not bool(torch.isfinite(rows).all()):
            raise InvalidArgument(f"input {name!r}: the sample holds NaN or infinite values", field=name)
        items = rows.shape[0]
        means = rows.mean(dim=0)
        stds = rows.std(dim=0, unbiased=False)
        quantiles = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
        # torch.quantile takes at most 2**24 values: evenly spaced rows stand in for a huge sample.
        step = max(1, math.ceil(rows.numel() / 2**24))
        # "lower": edges are values of the sample, so a discrete feature's bins match its values.
        edges = torch.quantile(rows[::step], quantiles, dim=0, interpolation="lower").T  # [F, bins-1]
        message = registry_pb2.InputBaseline(input=name, item_count=items)
        for feature in range(rows.shape[1]):
            inner = torch.unique(edges[feature])  # sorted, duplicates merged
            counts = torch.bincount(
                torch.searchsorted(inner, rows[:, feature].contiguous(), side="left"),
                minlength=inner.numel() + 1,
            )
            message.features.add(
                mean=float(means[feature]),
                std=float(stds[feature]),
                bin_edges=inner.tolist(),
                bin_fractions=(counts.to(torch.float64) / items).tolist(),
            )
        out.append(message)
    return out


def population_stability_index(
    expected: Sequence[float],
    actual: Sequence[float],
    *,
    expected_items: float = 0.0,
    smoothing: float = PSI_SMOOTHING,
) -> float:
    """PSI = sum over bins of (a - e) * ln(a / e), `a` and `e` the window's and the baseline's
    fractions of items per bin. 0 for identical distributions; about 0.1 is a moderate shift
    and 0.25 a large one by the usual rule of thumb.

    Counts are smoothed before the fractions are taken: `smoothing` items are added to every
    bin of the window (and of the baseline, when its size is known), so an empty bin is a
    bin that held fewer items than expected rather than one with a fraction of 0 (whose
    logarithm would be infinite). The index still grows as the window shrinks (its noise
    floor is about `(bins - 1) * (1 / items + 1 / expected_items)`): it describes how far a
    distribution moved, it does not test whether it did (`monitor_service.significance` does).

    Args:
        expected: The baseline's fraction (or count) per bin.
        actual: The window's count of items per bin, same length.
        expected_items: The size of the baseline's sample (its fractions are smoothed like
            the window's counts); 0 when unknown (its fractions are then floored at
            `PSI_FLOOR`).
        smoothing: Items added to every bin before taking fractions (0.5: Jeffreys).

    Returns:
        The index; NaN when either side is empty or the lengths differ.
    """
    if len(expected) != len(actual) or not expected:
        return math.nan
    expected_total, actual_total = float(sum(expected)), float(sum(actual))
    if expected_total <= 0 or actual_total <= 0:
        return math.nan
    bins = len(expected)
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        if expected_items > 0:
            ef = (e / expected_total * expected_items + smoothing) / (expected_items + bins * smoothing)
        else:
            ef = max(e / expected_total, PSI_FLOOR)
        af = (a + smoothing) / (actual_total + bins * smoothing)
        if smoothing <= 0:
            af = max(af, PSI_FLOOR)
        total += (af - ef) * math.log(af / ef)
    return total


def load_baseline_sample(path: str | Path, signature: tensor_pb2.Signature) -> dict[str, torch.Tensor]:
    """Read a baseline sample written with `torch.save`: a dict of input name -> tensor, or a
    single tensor for a model with one input. Only tensors are read (`weights_only=True`):
    a file that would unpickle anything else is refused.

    Raises:
        InvalidArgument: unreadable, not tensors, a single tensor for a model with several
            inputs, or an input name the signature does not have.
    """
    import torch

    try:
        loaded = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, OSError, RuntimeError: all mean "not usable"
        # torch's own message runs to many lines of advice on trusting the file: only its gist.
        gist = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise InvalidArgument(
            f"{path}: not a torch.save'd tensor or dict of tensors ({type(exc).__name__}"
            + (f": {gist[:200]}" if gist else "")
            + ")",
            field="baseline_sample",
        ) from exc
    names = [spec.name for spec in signature.inputs]
    if isinstance(loaded, torch.Tensor):
        if len(names) != 1:
            raise InvalidArgument(
                f"{path} holds one tensor but the model takes {len(names)} inputs "
                f"({', '.join(names)}); save a dict of input name -> tensor",
                field="baseline_sample",
            )
        return {names[0]: loaded}
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise InvalidArgument(
            f"{path} must hold a tensor or a dict of input name -> tensor", field="baseline_sample"
        )
    unknown = sorted(set(loaded) - set(names))
    if unknown:
        raise InvalidArgument(
            f"{path} names input(s) {', '.join(unknown)} that the signature does not have "
            f"(inputs: {', '.join(names)})",
            field="baseline_sample",
        )
    return dict(loaded)
