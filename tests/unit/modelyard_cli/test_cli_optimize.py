"""`modelyard optimize`'s choice: the fastest fp32 report within tolerance, never a refused one."""

from __future__ import annotations

from modelyard.v1 import registry_pb2
from modelyard_cli.optimize import recommend, within_tolerance


def report(
    profile: str, speed: float, max_abs: float = 0.0, top1: float | None = None, **fields: str
) -> registry_pb2.OptimizationReport:
    message = registry_pb2.OptimizationReport(
        optimization=profile,
        precision="fp32",
        device="cpu",
        items_per_s_max_batch=speed,
        max_abs_error=max_abs,
    )
    if top1 is not None:
        message.top1_agreement = top1
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def test_the_fastest_within_tolerance_is_recommended() -> None:
    reports = [
        report("none", 100),
        report("int8_dynamic", 300, max_abs=0.05, top1=0.97),
        report("freeze", 200),
    ]
    assert recommend(reports, None, None) == ("int8_dynamic", "fp32")
    assert recommend(reports, 0.01, None) == ("freeze", "fp32")
    assert recommend(reports, None, 0.99) == ("freeze", "fp32")
    assert recommend(reports, 0.1, 0.95) == ("int8_dynamic", "fp32")


def test_a_refused_report_is_never_recommended_and_a_precision_comes_with_its_profile() -> None:
    reports = [
        report("none", 100),
        report("compile", 900, error="compile builds torch.export programs"),
        report("freeze", 500, max_abs=0.004, precision="bf16"),
    ]
    assert not within_tolerance(reports[1], None, None)
    assert recommend(reports, None, None) == ("freeze", "bf16")
    assert recommend(reports, 0.001, None) == ("none", "fp32")
    assert recommend([], None, None) == ("none", "fp32")


def test_top1_is_judged_only_where_it_was_measured() -> None:
    assert within_tolerance(report("freeze", 1.0), None, 0.99)
    assert not within_tolerance(report("freeze", 1.0, top1=0.5), None, 0.99)
