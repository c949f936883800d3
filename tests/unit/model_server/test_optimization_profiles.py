"""The optimisation profiles and the report's maths: errors, top-1 agreement, the baseline
sample, the tolerance, which formats take which profile, and int8/freeze on a tiny model."""

from __future__ import annotations

import hashlib
import io
import math

import pytest
import torch

from model_server.loader import Artifact, load_module
from model_server.optimization import (
    RELATIVE_FLOOR,
    OptimizationReport,
    Optimizer,
    Tolerance,
    check_profile,
    compare_outputs,
    report_for,
    sample_inputs,
)
from modelyard.errors import FailedPrecondition
from modelyard.v1 import registry_pb2, tensor_pb2
from tests.unit.model_server.model_artifacts import make_signature, mlp


def test_errors_are_the_largest_absolute_and_relative_differences() -> None:
    reference = torch.tensor([[1.0, -2.0], [4.0, 0.0]])
    candidate = torch.tensor([[1.1, -2.0], [4.0, 0.004]])
    max_abs, max_rel, top1 = compare_outputs([reference], [candidate])
    assert max_abs == pytest.approx(0.1)
    # 0.1/1 for the first element; 0.004 / (0.001 * 4) = 1.0 for the one whose reference is 0.
    assert max_rel == pytest.approx(0.004 / (RELATIVE_FLOOR * 4.0))
    assert top1 == 1.0


def test_top1_agreement_counts_rows_whose_argmax_moved() -> None:
    reference = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.2, 0.1], [0.0, 3.0]])
    candidate = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.2, 0.1], [0.0, 3.0]])
    assert compare_outputs([reference], [candidate])[2] == pytest.approx(0.75)


def test_top1_is_unset_without_a_classifier_shaped_output() -> None:
    assert compare_outputs([torch.ones(4)], [torch.ones(4)])[2] is None
    assert compare_outputs([torch.ones(4, 1)], [torch.ones(4, 1)])[2] is None


def test_a_non_finite_candidate_is_an_infinite_error() -> None:
    max_abs, max_rel, _ = compare_outputs([torch.ones(2, 2)], [torch.tensor([[1.0, math.nan], [1.0, 1.0]])])
    assert max_abs == math.inf and max_rel == math.inf


def test_mismatched_outputs_are_refused() -> None:
    with pytest.raises(ValueError):
        compare_outputs([torch.ones(2, 2)], [torch.ones(2, 3)])
    with pytest.raises(ValueError):
        compare_outputs([torch.ones(2)], [])


def _report(max_abs: float, top1: float | None) -> OptimizationReport:
    return OptimizationReport(
        profile="int8_dynamic", precision="fp32", device="cpu", max_abs_error=max_abs,
        max_rel_error=0.0, top1_agreement=top1, items_per_s_batch1=1.0, items_per_s_max_batch=1.0,
        max_batch=8, load_s=0.0, sample="baseline", sample_items=8,
    )  # fmt: skip


def test_the_tolerance_names_the_limit_a_report_breaks() -> None:
    assert Tolerance().violation(_report(10.0, 0.0)) is None
    assert Tolerance(max_abs_error=0.01).violation(_report(0.01, None)) is None
    breach = Tolerance(max_abs_error=0.01).violation(_report(0.02, None))
    assert breach is not None and "max_abs_error 0.01" in breach
    breach = Tolerance(min_top1_agreement=0.99).violation(_report(0.0, 0.98))
    assert breach is not None and "min_top1_agreement" in breach
    # No classifier-shaped output: the top-1 limit has nothing to judge.
    assert Tolerance(min_top1_agreement=0.99).violation(_report(0.0, None)) is None


def test_the_sample_is_drawn_from_the_baseline() -> None:
    signature = make_signature(inputs=(("input", tensor_pb2.DATA_TYPE_FP32, (-1, 2)),))
    baseline = registry_pb2.InputBaseline(
        input="input",
        item_count=100,
        features=[registry_pb2.FeatureBaseline(mean=10.0, std=0.5), registry_pb2.FeatureBaseline(mean=-3.0)],
    )
    (inputs,), kind = sample_inputs(signature, [baseline], 4000)
    assert kind == "baseline" and inputs.shape == (4000, 2)
    assert inputs[:, 0].mean().item() == pytest.approx(10.0, abs=0.05)
    assert inputs[:, 0].std().item() == pytest.approx(0.5, abs=0.05)
    assert torch.all(inputs[:, 1] == -3.0)  # std 0: a constant feature
    (synthetic,), kind = sample_inputs(signature, [], 8)
    assert kind == "synthetic" and synthetic.shape == (8, 2)


@pytest.mark.parametrize(
    ("profile", "platform", "device", "precision", "says"),
    [
        ("int8_dynamic", "torch_export", "cpu", "fp32", "no nn.Linear"),
        ("freeze", "torch_export", "cpu", "fp32", "compile"),
        ("compile", "torchscript", "cpu", "fp32", "freeze"),
        ("int8_dynamic", "torchscript", "cuda:0", "fp32", "CPU only"),
        ("int8_dynamic", "torchscript", "cpu", "bf16", "precision fp32"),
        ("fast", "torchscript", "cpu", "fp32", "not valid"),
    ],
)
def test_a_profile_a_version_cannot_take_is_refused_with_the_reason(
    profile: str, platform: str, device: str, precision: str, says: str
) -> None:
    with pytest.raises(FailedPrecondition, match=says):
        check_profile(profile, platform, device, precision)


def _torchscript(module: torch.nn.Module) -> Artifact:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    data = buffer.getvalue()
    return Artifact(
        model="m", version=1, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
        sha256=hashlib.sha256(data).hexdigest(), signature=make_signature(), data=data,
    )  # fmt: skip


@pytest.mark.parametrize("profile", ["int8_dynamic", "freeze"])
def test_torchscript_profiles_apply_and_are_measured_against_fp32_eager(profile: str) -> None:
    artifact = _torchscript(mlp())
    reference = load_module(artifact, "cpu")
    optimised, hit = Optimizer().apply(
        load_module(artifact, "cpu"),
        profile=profile,
        platform="torchscript",
        device="cpu",
        sha256=artifact.sha256,
        data=artifact.data,
    )
    assert not hit
    report = report_for(
        profile=profile, precision="fp32", device="cpu", reference=reference, candidate=optimised,
        signature=artifact.signature, baselines=(), max_batch=8, load_s=0.1, sample_items=64, budget_s=0.01,
    )  # fmt: skip
    assert report.sample == "synthetic" and report.sample_items == 64 and report.max_batch == 8
    assert report.items_per_s_batch1 > 0 and report.items_per_s_max_batch > 0
    assert report.top1_agreement is not None and report.top1_agreement > 0.9
    if profile == "int8_dynamic":
        # It really quantised: fp32 rounding alone would differ by ~1e-7.
        assert 1e-5 < report.max_abs_error < 0.1
    else:
        assert report.max_abs_error < 1e-5


def test_compile_without_a_cache_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="compile cache"):
        Optimizer().apply(mlp(), profile="compile", platform="torch_export", device="cpu", sha256="0")


def test_a_quantiser_crash_fails_the_profile_and_not_the_server() -> None:
    # torch 2.13's graph-mode quantiser segfaults on a scripted TransformerEncoder; it runs
    # in a child process, so this process lives on to say why.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    artifact = _torchscript(encoder)
    with pytest.raises(FailedPrecondition, match="int8_dynamic.*(crashed|failed)"):
        Optimizer().apply(
            load_module(artifact, "cpu"),
            profile="int8_dynamic",
            platform="torchscript",
            device="cpu",
            sha256=artifact.sha256,
            data=artifact.data,
        )
