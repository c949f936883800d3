"""Every Redis key Modelyard uses is built here, and only `coordination.py` imports this.

A model's keys carry the model name in braces, a Redis Cluster hash tag, so the aliases,
deployment and epoch of one model share a slot and one Lua script can touch them together.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeySchema"]


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Key names under one prefix (default "my")."""

    prefix: str = "my"

    def models(self) -> str:
        """Set of every model name."""
        return f"{self.prefix}:models"

    def aliases(self, model: str) -> str:
        """Hash alias -> version number of one model."""
        return f"{self.prefix}:model:{{{model}}}:aliases"

    def deployment(self, model: str) -> str:
        """JSON `Deployment` of one model: placement, serving settings, traffic split."""
        return f"{self.prefix}:model:{{{model}}}:deployment"

    def epoch(self, model: str) -> str:
        """Integer that grows with every routing change of one model."""
        return f"{self.prefix}:model:{{{model}}}:epoch"

    def services(self) -> str:
        """Sorted set of service ids scored by last heartbeat (unix ms)."""
        return f"{self.prefix}:services"

    def service(self, service_id: str) -> str:
        """JSON membership record of one service; expires when heartbeats stop."""
        return f"{self.prefix}:service:{service_id}"

    def events_channel(self) -> str:
        """Pub/sub channel of change events (alias moves, membership changes)."""
        return f"{self.prefix}:events"

    def events_log(self) -> str:
        """Stream holding the recent change events, for late readers and audits."""
        return f"{self.prefix}:events:log"

    def access_keys(self) -> str:
        """Hash key id -> JSON KeyRecord (hashes and grants of the API keys, never secrets)."""
        return f"{self.prefix}:access:keys"

    def access_epoch(self) -> str:
        """Integer that grows with every change of the API keys."""
        return f"{self.prefix}:access:epoch"

    def all_keys(self) -> dict[str, str]:
        """Every key pattern with its meaning, for docs/architecture.md."""
        return {
            self.models(): "set of model names",
            self.aliases("<model>"): "hash alias -> version",
            self.deployment("<model>"): "JSON Deployment: placed versions, serving settings, split",
            self.epoch("<model>"): "routing epoch of the model (int)",
            self.services(): "zset service id -> last heartbeat (unix ms)",
            self.service("<id>"): "JSON membership record (expires)",
            self.events_channel(): "pub/sub change events",
            self.events_log(): "stream of recent change events",
            self.access_keys(): "hash key id -> JSON API key record (hash, grants, expiry, limits)",
            self.access_epoch(): "epoch of the API keys (int)",
        }
