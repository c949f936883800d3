"""Settings of a model server: env prefix `MODELYARD_MODEL_SERVER_`, nested fields with `__`.

For example `MODELYARD_MODEL_SERVER_MAX_BATCH_SIZE=32` or
`MODELYARD_MODEL_SERVER_SERVER__PORT=50082`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from modelyard.settings import ServiceSettings, SigningSettings

__all__ = ["ModelServerSettings", "resolve_torch_threads"]


class ModelServerSettings(ServiceSettings):
    """Everything a model server is told at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="MODELYARD_MODEL_SERVER_", env_nested_delimiter="__", extra="ignore"
    )
    default_port: ClassVar[int] = 50081

    registry_address: str = "127.0.0.1:50061"
    """host:port of the registry, where artifacts are downloaded from."""
    device: str = "cpu"
    """Where models run unless their deployment says otherwise: "cpu", "cuda", "cuda:N" or
    "auto" (the first CUDA device if there is one, else the CPU)."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Compute precision unless a deployment says otherwise: fp16 on GPU only, bf16 on both."""
    compile_cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "modelyard" / "compiled")
    """Where `compile` deployments keep their AOTInductor packages, one per artifact sha256,
    device, torch version and profile; a restart loads them instead of compiling again."""
    torch_threads: PositiveInt | None = None
    """Torch intra-op threads; unset means one per core left after the event loop's, divided
    among the instances (at least 1)."""
    max_batch_size: PositiveInt = 64
    """Most items (rows on dim 0) one forward pass takes; a larger request runs alone."""
    max_queue_delay_ms: NonNegativeFloat = 2.0
    """Longest a request waits for company while another batch is in flight (see
    `model_server.batching` for when the window applies at all)."""
    max_queue_size: PositiveInt = 1024
    """Most items waiting per loaded version; beyond it requests fail with RESOURCE_EXHAUSTED."""
    instances: PositiveInt = 1
    """Worker threads per loaded version, each running one batch at a time."""
    preferred_batch_sizes: tuple[PositiveInt, ...] = ()
    """Batch sizes dispatched as soon as a group can fill one (the largest it can), without
    waiting for `max_batch_size` or the window, e.g. `[8,16,32]` in the environment (JSON);
    each at most `max_batch_size`. Empty: none."""
    execution: Literal["auto", "loop", "thread"] = "auto"
    """Where batches run unless a deployment says otherwise: "thread" (worker threads),
    "loop" (the event loop, for forwards well under a millisecond; needs `instances` 1) or
    "auto" (the loop for a CPU version with one instance whose warm-up forward at
    `max_batch_size` is fast, threads otherwise). See `model_server.batching`."""
    reconcile_interval_s: PositiveFloat = 1.0
    """How often the server compares what it holds with what the aliases in Redis point at
    (it also reacts at once to alias events)."""
    drain_settle_s: NonNegativeFloat = 0.5
    """On shutdown, time between leaving the cluster (health NOT_SERVING, membership record
    deleted) and stopping the listener, so that calls routed here just before still land on
    a handler instead of being cancelled by the stop."""
    signing: SigningSettings = Field(default_factory=SigningSettings)
    """Trusted model signers, checked before every load (the same files as the registry's):
    a signed version must verify, an unsigned one is refused if its model requires a
    signature or `require_signatures` is set."""
    load_retry_max_s: PositiveFloat = 60.0
    """Longest wait before retrying a version whose load failed (the wait doubles per failure)."""

    # Field validators, not a model one, so that the error names the variable. Each runs
    # after the fields declared before it (max_batch_size, instances) are validated.
    @field_validator("preferred_batch_sizes")
    @classmethod
    def _fit_max_batch_size(cls, sizes: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        top = info.data.get("max_batch_size")
        too_big = sorted({size for size in sizes if top is not None and size > top})
        if too_big:
            raise ValueError(f"{too_big} exceed max_batch_size ({top})")
        return sizes

    @field_validator("execution")
    @classmethod
    def _loop_runs_one_instance(cls, execution: str, info: ValidationInfo) -> str:
        instances = info.data.get("instances")
        if execution == "loop" and instances not in (None, 1):
            raise ValueError(f"'loop' runs one batch at a time: needs instances 1, not {instances}")
        return execution


def resolve_torch_threads(torch_threads: int | None, instances: int, cores: int | None = None) -> int:
    """The intra-op thread count to use.

    Unset: the cores this process may run on, less one for the event loop and gRPC, shared
    among the instances. On a 2-core box that is 1, which measured best for peers too: a
    second spinning torch thread competes with the event loop (../shared/bench/PEERS.md).
    """
    if torch_threads is not None:
        return torch_threads
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - 1) // instances)
