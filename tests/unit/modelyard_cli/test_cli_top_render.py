"""`modelyard top`'s frame: GPU memory per service when a process reports it, PSI next to drift."""

from __future__ import annotations

from rich.console import Console

from modelyard.v1 import monitor_service_pb2 as pb
from modelyard_cli.top import render


def text_of(stats: pb.GetModelStatsResponse) -> str:
    status = pb.GetClusterStatusResponse(
        services=[
            pb.ServiceStatus(id="ms-gpu", kind=pb.SERVICE_KIND_MODEL_SERVER, state=pb.SERVICE_STATE_UP),
            pb.ServiceStatus(id="gw-1", kind=pb.SERVICE_KIND_GATEWAY, state=pb.SERVICE_STATE_UP),
        ]
    )
    console = Console(width=240, record=True, color_system=None)
    console.print(render(status, stats, pb.ListAlertsResponse(), now=0.0))
    return console.export_text()


def test_gpu_memory_and_psi_are_shown() -> None:
    stats = pb.GetModelStatsResponse(
        versions=[pb.VersionStats(model="mlp", version=2, input_drift=1.25, input_psi=0.31)],
        processes=[
            pb.ProcessStats(
                service_ids=["ms-gpu"], gpu_memory_bytes=3 * 2**30 // 2, gpu_memory_reserved_bytes=2 * 2**30
            ),
            pb.ProcessStats(service_ids=["gw-1"], resident_memory_bytes=10**8),
        ],
    )
    text = text_of(stats)
    assert "gpu mem" in text and "1.5 GiB (2.0 GiB resv)" in text
    gateway_row = next(line for line in text.splitlines() if "gw-1" in line)
    assert "GiB" not in gateway_row
    header = next(line for line in text.splitlines() if "drift" in line)
    assert header.index("drift") < header.index("psi")
    mlp_row = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("mlp"))
    assert "1.25" in mlp_row and "0.31" in mlp_row


def test_no_gpu_column_when_no_process_reports_gpu_memory() -> None:
    stats = pb.GetModelStatsResponse(
        versions=[pb.VersionStats(model="mlp", version=2)],
        processes=[pb.ProcessStats(service_ids=["ms-gpu"], resident_memory_bytes=10**8)],
    )
    text = text_of(stats)
    assert "gpu mem" not in text and "psi" in text


def test_metrics_addresses_are_shown_per_service() -> None:
    status = pb.GetClusterStatusResponse(
        services=[
            pb.ServiceStatus(
                id="gw-1",
                kind=pb.SERVICE_KIND_GATEWAY,
                state=pb.SERVICE_STATE_UP,
                address="127.0.0.1:41001",
                metrics_address="127.0.0.1:39555",
                metrics_scheme="https",
            ),
            pb.ServiceStatus(id="old", kind=pb.SERVICE_KIND_REGISTRY, state=pb.SERVICE_STATE_UP),
        ]
    )
    console = Console(width=240, record=True, color_system=None)
    console.print(render(status, pb.GetModelStatsResponse(), pb.ListAlertsResponse(), now=0.0))
    text = console.export_text()
    assert "metrics" in text
    gateway_row = next(line for line in text.splitlines() if "gw-1" in line)
    assert "https://127.0.0.1:39555" in gateway_row


def test_a_shadow_column_only_when_a_version_was_mirrored_to() -> None:
    plain = pb.VersionStats(model="mlp", version=1, aliases=["production"])
    assert "shadow" not in text_of(pb.GetModelStatsResponse(versions=[plain]))
    mirrored = pb.VersionStats(
        model="mlp",
        version=2,
        aliases=["shadow"],
        shadow=pb.ShadowStats(comparisons=40, mismatches=10, mismatch_rate=0.25, max_abs_diff=0.0312),
    )
    identical = pb.VersionStats(
        model="mlp",
        version=3,
        shadow=pb.ShadowStats(comparisons=8, mismatches=0, mismatch_rate=0.0, max_abs_diff=0.0),
    )
    text = text_of(pb.GetModelStatsResponse(versions=[plain, mirrored, identical]))
    header = next(line for line in text.splitlines() if "psi" in line)
    assert header.index("psi") < header.index("shadow")
    rows = {
        line.split("│")[2].strip(): line for line in text.splitlines() if line.lstrip("│ ").startswith("mlp")
    }
    assert "25% of 40 max|Δ| 3.12e-02" in rows["2"]
    assert "0% of 8 max|Δ| 0.00e+00" in rows["3"]
    assert rows["1"].rstrip(" │").endswith("-")


def test_no_data_alerts_are_listed_with_the_firing_ones_and_the_drift_p_value_is_shown() -> None:
    status = pb.GetClusterStatusResponse()
    stats = pb.GetModelStatsResponse(
        versions=[
            pb.VersionStats(model="mlp", version=2, input_drift_p=2e-7),
            pb.VersionStats(model="idle", version=1),
        ]
    )
    alerts = pb.ListAlertsResponse(
        alerts=[
            pb.Alert(name="InputDrift", state=pb.ALERT_STATE_NO_DATA, labels={"model": "mlp"}),
            pb.Alert(name="SlowP99", state=pb.ALERT_STATE_FIRING, labels={"model": "mlp"}),
            pb.Alert(name="Later", state=pb.ALERT_STATE_PENDING, labels={"model": "mlp"}),
        ]
    )
    console = Console(width=240, record=True, color_system=None)
    console.print(render(status, stats, alerts, now=0.0))
    text = console.export_text()
    assert "firing alerts (2)" in text and "Later" not in text
    assert "no data" in next(line for line in text.splitlines() if "InputDrift" in line)
    assert "2e-07" in next(line for line in text.splitlines() if line.lstrip("│ ").startswith("mlp"))
    idle_row = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("idle"))
    assert "e-" not in idle_row
