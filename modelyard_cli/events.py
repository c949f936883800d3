"""`modelyard events`: the cluster's events as the monitor streams them (WatchEvents), one
line each.

Usage::

    modelyard events                          # every event from now on, until Ctrl-C
    modelyard events --model mlp --type shadow --type canary
    modelyard events --count 1 --json         # the next event's payload, for scripts
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.markup import escape

from modelyard.tls import open_channel
from modelyard.v1 import monitor_service_pb2 as pb
from modelyard.v1 import monitor_service_pb2_grpc as pb_grpc
from modelyard_cli.local_cluster import api_key_for, client_tls_for

__all__ = ["events", "format_event"]

_STYLE = {"alert": "red", "canary": "yellow", "shadow": "magenta", "service": "cyan"}


def format_event(event: pb.WatchEventsResponse) -> str:
    """One line: local time, type, model and the monitor's summary (rich markup)."""
    at = datetime.datetime.fromtimestamp(event.event_time.ToNanoseconds() / 1e9)
    style = _STYLE.get(event.type, "")
    kind = f"[{style}]{event.type:<8}[/]" if style else f"{event.type:<8}"
    return f"{at:%H:%M:%S} {kind} {escape(event.model or '-'):<16} {escape(event.summary)}"


async def _watch(
    monitor: str, model: str, types: list[str], count: int, as_json: bool, console: Console
) -> None:
    async with open_channel(monitor, client_tls_for(monitor), token=api_key_for(monitor)) as channel:
        call = pb_grpc.MonitorServiceStub(channel).WatchEvents(pb.WatchEventsRequest(model=model))
        shown = 0
        async for event in call:
            if types and event.type not in types:
                continue
            if as_json:
                console.print_json(event.payload_json)
            else:
                console.print(format_event(event), soft_wrap=True, highlight=False)
            shown += 1
            if count and shown >= count:
                call.cancel()
                return


def events(
    monitor: Annotated[str, typer.Option(help="host:port of the monitor.")] = "127.0.0.1:50071",
    model: Annotated[str, typer.Option(help="Only this model's events (service events always).")] = "",
    type_: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            help="Only events of this type (aliases, service, load, unload, alert, canary, shadow); "
            "repeat for several.",
        ),
    ] = None,
    count: Annotated[int, typer.Option(min=0, help="Stop after this many events; 0: never.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print each event's JSON payload.")] = False,
) -> None:
    """Stream the cluster's events from the monitor: alias moves, services up and down, version
    loads, alerts, canary decisions and shadow mismatches."""
    console = Console()
    try:
        asyncio.run(_watch(monitor, model, type_ or [], count, as_json, console))
    except KeyboardInterrupt:
        pass
    except grpc.aio.AioRpcError as err:
        console.print(f"[red]monitor at {monitor}: {err.code().name}: {err.details()}[/]")
        raise typer.Exit(1) from None
