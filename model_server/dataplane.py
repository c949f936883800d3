"""The model server's data plane: the one way into inference, whichever protocol. No gRPC here.

Both servicers only decode, call `infer`, and encode::

    ModelServerService.Infer (modelyard.v1) ─┐
                                             ├─► ModelServerDataPlane.infer(model, version,
    GRPCInferenceService.ModelInfer (OIP) ───┘        inputs, output_names, deadline)

    1. resolve: the version, ready on this server (NOT_FOUND when the model is not held,
       UNAVAILABLE VERSION_NOT_READY when this version is not ready here: another replica may
       have it, so the gateway retries there)
    2. check the outputs asked for; then, counted from here, the inputs in full against the
       signature (`modelyard.validation`, the same check the gateway makes): nothing invalid
       ever reaches a batch shared with other callers
    3. decode them zero-copy (`torch.frombuffer` over the request's bytes)
    4. submit to the version's batcher (deadline; a failing batch is split to find the
       requests at fault, see `model_server.batching`)
    5. return the outputs asked for

The input check to the answer is counted and timed per version in `RequestStats`, and one request in
`input_sample_every` is sampled for the monitor's input statistics. Names the caller made up
never become metric labels: a version is counted only once it resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_server.batching import BatchTiming
from model_server.repository import LoadedVersion, ModelRepository
from model_server.stats import RequestStats
from modelyard.errors import InvalidArgument, ModelNotFound, VersionNotReady
from modelyard.tensor_codec import tensor_from_wire
from modelyard.validation import MAX_VERSION, WireTensor, shown

__all__ = ["Inference", "ModelServerDataPlane"]


@dataclass(frozen=True, slots=True)
class Inference:
    """One answered request."""

    loaded: LoadedVersion
    """The version that served it."""
    outputs: list[tuple[str, torch.Tensor]]
    """The outputs asked for (all, in signature order, when none was named)."""
    timing: BatchTiming


class ModelServerDataPlane:
    """Inference on the versions this server holds (see the module docstring).

    Args:
        repository: The versions held, and their lifecycle.
        stats: Per-version request figures and input statistics (the monitor's contract).
    """

    def __init__(self, repository: ModelRepository, stats: RequestStats | None = None) -> None:
        self.repository = repository
        self._stats = stats or RequestStats()

    def resolve(self, model: str, version: int | None) -> LoadedVersion:
        """The ready version a request names; `None` means the highest version ready here.

        Raises:
            InvalidArgument: no model named, or a version outside 1..2^63-1.
            ModelNotFound: this server holds no version of the model.
            VersionNotReady: it holds the model, but not this version ready.
        """
        if not model:
            raise InvalidArgument("name the model", field="model")
        repository = self.repository
        if version is None:
            loaded = repository.highest_ready(model)
            if loaded is not None:
                return loaded
        elif not 1 <= version <= MAX_VERSION:
            raise InvalidArgument(f"version must be 1 or more, got {version}", field="version")
        if not repository.holds(model):
            raise ModelNotFound(f"model {shown(model)} is not held by this server", field="model")
        if version is None:
            raise VersionNotReady(
                f"model {shown(model)} has no ready version on this server yet",
                metadata={"model": model[:64]},
            )
        return repository.ready(model, version)

    async def infer(
        self,
        model: str,
        version: int | None,
        inputs: Sequence[WireTensor],
        output_names: Sequence[str],
        deadline: float | None,
        *,
        request_id: str = "",
        output_field: str = "output_names",
    ) -> Inference:
        """Answer one request (see the module docstring for the steps).

        Args:
            model: The model's name.
            version: The exact version, or None for the highest ready here.
            inputs: The request's tensors, as they came (any order).
            output_names: Outputs to return, in this order; empty means all.
            deadline: `loop.time()` after which the request is dropped before compute.
            request_id: For the log when its forward fails.
            output_field: How the protocol names the field of an unknown output.

        Raises:
            InvalidArgument, ModelNotFound, VersionNotReady: from `resolve`.
            SignatureMismatch: an input is unknown, repeated, missing, of the wrong type or
                shape, or its bytes do not match its shape (the field names it).
            InvalidArgument: an unknown output name.
            ModelFailedOnInput: the model's forward raised on this request's input.
            QueueFull, DeadlineExceeded, Draining, ModelExecutionError: from the batcher.
        """
        loaded = self.resolve(model, version)
        check = loaded.check
        selected = check.select_outputs(output_names, output_field)

        async def run() -> Inference:
            tensors = [tensor_from_wire(t) for t in check.check(inputs)]
            batcher = loaded.batcher
            if batcher is None:  # unloaded since `resolve`
                loaded_now = self.repository.ready(loaded.model, loaded.version)
                batcher = loaded_now.batcher
                assert batcher is not None  # ready() checked it
            outputs, timing = await batcher.submit(tensors, deadline, request_id=request_id)
            names = check.outputs
            if selected is None:
                named = list(zip(names, outputs, strict=True))
            else:
                named = [(names[i], outputs[i]) for i in selected]
            return Inference(loaded, named, timing)

        return await self._stats.observe(loaded.model, loaded.version, inputs, run)
