"""GPU memory figures of the model server: reading the devices and the /metrics collector."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, generate_latest

from model_server.stats import DEVICE_MEMORY, DeviceMemory, read_device_memory


class StandInCuda:
    """The four `torch.cuda` functions the reader uses, over made-up devices."""

    def __init__(self, devices: list[tuple[int, int]], *, available: bool = True) -> None:
        self.devices = devices
        self.available = available
        self.memory_calls = 0

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return len(self.devices)

    def memory_allocated(self, device: int) -> int:
        self.memory_calls += 1
        return self.devices[device][0]

    def memory_reserved(self, device: int) -> int:
        self.memory_calls += 1
        return self.devices[device][1]


def test_every_visible_device_is_read_in_order() -> None:
    cuda = StandInCuda([(1_000, 4_096), (0, 2_048)])
    assert read_device_memory(cuda) == [("cuda:0", 1_000, 4_096), ("cuda:1", 0, 2_048)]


def test_without_cuda_no_device_is_asked_for_memory() -> None:
    cuda = StandInCuda([(1_000, 4_096)], available=False)
    assert read_device_memory(cuda) == []
    assert cuda.memory_calls == 0


def test_the_collector_exports_allocated_and_reserved_per_device() -> None:
    registry = CollectorRegistry()
    registry.register(DeviceMemory(StandInCuda([(1_000, 4_096), (0, 2_048)])))
    text = generate_latest(registry).decode()
    assert "# TYPE modelyard_model_server_device_memory_bytes gauge" in text
    for line in (
        'modelyard_model_server_device_memory_bytes{device="cuda:0",kind="allocated"} 1000.0',
        'modelyard_model_server_device_memory_bytes{device="cuda:0",kind="reserved"} 4096.0',
        'modelyard_model_server_device_memory_bytes{device="cuda:1",kind="allocated"} 0.0',
        'modelyard_model_server_device_memory_bytes{device="cuda:1",kind="reserved"} 2048.0',
    ):
        assert line in text


def test_registering_and_scraping_without_cuda_reads_nothing() -> None:
    cuda = StandInCuda([(1_000, 4_096)], available=False)
    registry = CollectorRegistry()
    registry.register(DeviceMemory(cuda))
    text = generate_latest(registry).decode()
    assert "modelyard_model_server_device_memory_bytes{" not in text
    assert cuda.memory_calls == 0


def test_a_failing_driver_leaves_the_rest_of_metrics_intact() -> None:
    class Broken(StandInCuda):
        def memory_allocated(self, device: int) -> int:
            raise RuntimeError("driver gone")

    registry = CollectorRegistry()
    registry.register(DeviceMemory(Broken([(1, 1)])))
    assert "modelyard_model_server_device_memory_bytes{" not in generate_latest(registry).decode()


def test_the_registered_collector_reads_torch_cuda() -> None:
    samples = [s for family in DEVICE_MEMORY.collect() for s in family.samples]
    expected = torch.cuda.device_count() * 2 if torch.cuda.is_available() else 0
    assert len(samples) == expected
