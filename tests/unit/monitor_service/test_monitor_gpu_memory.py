"""The monitor gathers the model servers' GPU memory into its per-process figures."""

from __future__ import annotations

import pytest

from modelyard.coordination import CoordinationStore, ServiceRecord
from monitor_service.collector import Collector, parse_snapshot
from monitor_service.servicer import _process_stats

GPU_METRICS = """\
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 5.0e+08
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
# HELP modelyard_model_server_device_memory_bytes GPU memory of this process per CUDA device.
# TYPE modelyard_model_server_device_memory_bytes gauge
modelyard_model_server_device_memory_bytes{{device="cuda:0",kind="allocated"}} {allocated}
modelyard_model_server_device_memory_bytes{{device="cuda:0",kind="reserved"}} 4.0e+09
modelyard_model_server_device_memory_bytes{{device="cuda:1",kind="allocated"}} 5.0e+08
modelyard_model_server_device_memory_bytes{{device="cuda:1",kind="reserved"}} 1.0e+09
modelyard_model_server_device_memory_bytes{{device="cuda:1",kind="other"}} 7.0
"""

CPU_ONLY_METRICS = """\
# TYPE process_start_time_seconds gauge
process_start_time_seconds 2000.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.0e+08
# HELP modelyard_model_server_device_memory_bytes GPU memory of this process per CUDA device.
# TYPE modelyard_model_server_device_memory_bytes gauge
"""


def test_the_family_is_parsed_per_device_and_kind() -> None:
    values = parse_snapshot(GPU_METRICS.format(cpu=1.0, allocated=1.5e9))
    assert values[("gpu", "", 0, "cuda:0")] == 1.5e9
    assert values[("gpu", "", 0, "cuda:1")] == 5.0e8
    assert values[("gpu_res", "", 0, "cuda:0")] == 4.0e9
    assert values[("gpu_res", "", 0, "cuda:1")] == 1.0e9
    assert not any(key[0] not in ("gpu", "gpu_res", "cpu", "rss", "start") for key in values)
    assert not any(k[0].startswith("gpu") for k in parse_snapshot(CPU_ONLY_METRICS))


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def scraped(store: CoordinationStore) -> Collector:
    """A collector that scraped a GPU model server twice and a CPU-only process once."""
    bodies = {
        "10.0.0.1:9000": GPU_METRICS.format(cpu=1.0, allocated=1.0e9),
        "10.0.0.2:9000": CPU_ONLY_METRICS,
    }

    async def fetch(address: str) -> str:
        return bodies[address]

    for sid, host in (("ms-gpu", "10.0.0.1"), ("ms-cpu", "10.0.0.2")):
        record = ServiceRecord(
            id=sid, kind="model_server", address=f"{host}:50051", metrics_address=f"{host}:9000"
        )
        await store.heartbeat(record, ttl_s=30)
    clock = Clock()
    collector = Collector(store, window_s=60.0, fetch=fetch, clock=clock)
    await collector.scrape()
    clock.now += 10.0
    # GPU memory is a gauge: the newest value counts, even when it went down.
    bodies["10.0.0.1:9000"] = GPU_METRICS.format(cpu=3.0, allocated=2.5e8)
    await collector.scrape()
    return collector


async def test_process_figures_sum_gpu_memory_over_devices(scraped: Collector) -> None:
    by_service = {p.service_ids[0]: p for p in scraped.process_stats()}
    gpu, cpu = by_service["ms-gpu"], by_service["ms-cpu"]
    assert gpu.gpu_memory_bytes == 2.5e8 + 5.0e8
    assert gpu.gpu_memory_reserved_bytes == 4.0e9 + 1.0e9
    assert gpu.cpu_usage == pytest.approx(0.2) and gpu.resident_memory_bytes == 5.0e8
    assert (cpu.gpu_memory_bytes, cpu.gpu_memory_reserved_bytes) == (0.0, 0.0)
    # Process-level series never show up as model versions.
    assert scraped.version_stats() == {}


async def test_the_process_message_carries_gpu_memory(scraped: Collector) -> None:
    by_service = {p.service_ids[0]: _process_stats(p) for p in scraped.process_stats()}
    assert by_service["ms-gpu"].gpu_memory_bytes == 750_000_000
    assert by_service["ms-gpu"].gpu_memory_reserved_bytes == 5_000_000_000
    assert by_service["ms-gpu"].resident_memory_bytes == 500_000_000
    assert by_service["ms-cpu"].gpu_memory_bytes == 0
