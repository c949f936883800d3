"""The load-test scenarios: who calls what, with how many users over time, and what the
runner does to the cluster meanwhile."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from load_tests.stages import Stage

__all__ = ["Action", "Scenario", "SCENARIOS"]


class Action(enum.Enum):
    """What the runner does to the cluster while the users call it."""

    NONE = "none"
    PROMOTE_ROLLBACK = "promote_rollback"
    """Promote a freshly uploaded version to the alias, then roll the alias back."""
    KILL_MODEL_SERVER = "kill_model_server"
    """SIGKILL a model server that the runner started for the run and joined to the cluster
    (`load_tests.joined_server`); the cluster's own servers are never touched."""


@dataclass(frozen=True)
class Scenario:
    """One scenario.

    Args:
        name: Its name on the command line and in `slo.yaml`.
        description: One line for `python -m load_tests list`.
        user_class: The locust user class in `locustfile.py`.
        users: Users at the steady level (the `--users` default).
        duration_s: The whole run (the `--duration` default).
        action: What the runner does meanwhile.
        spike_factor: For a spike: users at the peak = users × this, for the middle fifth.
    """

    name: str
    description: str
    user_class: str
    users: int = 16
    duration_s: float = 60.0
    action: Action = Action.NONE
    spike_factor: int = 0

    def stages(self, users: int, duration_s: float) -> list[Stage]:
        """The load over time for `users` users and a `duration_s` run."""
        if not self.spike_factor:
            return [Stage(duration_s, users, float(users))]
        peak = users * self.spike_factor
        # 40% at the base level, 20% at the peak (every extra user at once), 40% back down.
        return [
            Stage(duration_s * 0.4, users, float(users)),
            Stage(duration_s * 0.2, peak, float(peak)),
            Stage(duration_s * 0.4, users, float(peak)),
        ]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "Predict at a constant number of closed-loop users.", "PredictUser"),
        Scenario(
            "spike",
            "Predict with a sudden 4x burst of users for the middle fifth of the run.",
            "PredictUser",
            users=8,
            spike_factor=4,
        ),
        Scenario(
            "promote_rollback",
            "Predict while the registry promotes a new version (loaded first, then the alias "
            "flips) and then rolls it back.",
            "PredictUser",
            action=Action.PROMOTE_ROLLBACK,
        ),
        Scenario(
            "server_lost",
            "Predict while a model server that the runner joined to the cluster for the run is "
            "killed (SIGKILL).",
            "PredictUser",
            action=Action.KILL_MODEL_SERVER,
        ),
        Scenario("oip", "ModelInfer on the Open Inference Protocol (KServe v2) endpoint.", "OipInferUser"),
    )
}
