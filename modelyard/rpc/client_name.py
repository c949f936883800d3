"""A client's self-declared name: the `modelyard-<name>` product at the head of its
user-agent, which the cluster's own tools set on their channels (`open_channel(client=...)`).

It is a claim, never identity: with access control on, who a call is from is the principal
its credentials prove (`modelyard.access`), and the claim is not read at all. With access
control off nobody is authenticated, and the registry's audit log and alias history show the
claim, labelled as such ("monitor (claimed; access control off) at ipv4:127.0.0.1:34530"), so
that the monitor's, the demo's and the load tests' actions can still be told apart.

Usage::

    channel = grpc.aio.insecure_channel(address, options=user_agent_options("monitor"))
    ...
    name = claimed_name(context.invocation_metadata())   # "monitor", or None
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["CLIENT_NAME_PATTERN", "USER_AGENT_OPTION", "claimed_name", "user_agent_options"]

CLIENT_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")
"""A client name: a lower-case letter, then up to 31 letters, digits, '-' or '_'. No ':' or
space, so a claim can never read as a principal (`key:...`, `service:...`)."""

USER_AGENT_OPTION = "grpc.primary_user_agent"
"""The channel option gRPC puts at the head of every call's `user-agent`."""

_PRODUCT_PREFIX = "modelyard-"


def user_agent_options(name: str | None) -> tuple[tuple[str, str], ...]:
    """Channel options that make every call claim `name` (none for None or "").

    Raises:
        ValueError: `name` is not a valid client name (`CLIENT_NAME_PATTERN`).
    """
    if not name:
        return ()
    if CLIENT_NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"client name {name!r} must match {CLIENT_NAME_PATTERN.pattern}")
    return ((USER_AGENT_OPTION, f"{_PRODUCT_PREFIX}{name}"),)


def claimed_name(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The name a call's user-agent claims (its first product, `modelyard-<name>[/version]`),
    or None when it claims none or one that is not a valid client name."""
    for key, value in metadata or ():
        if key != "user-agent":
            continue
        text = value if isinstance(value, str) else value.decode(errors="replace")
        product = text.split(maxsplit=1)[0] if text.strip() else ""
        name = product.partition("/")[0]
        if not name.startswith(_PRODUCT_PREFIX):
            return None
        name = name[len(_PRODUCT_PREFIX) :]
        return name if CLIENT_NAME_PATTERN.fullmatch(name) else None
    return None
