"""`modelyard keys create | list | revoke | rotate`: the cluster's API keys.

Every command calls the registry's AccessService with an `admin` key (`--api-key`,
`$MODELYARD_API_KEY`, else the local cluster's admin key). A new key's token is printed once:
the registry keeps only its hash.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from modelyard.v1 import access_service_pb2 as pb
from modelyard.v1 import access_service_pb2_grpc
from modelyard_cli.registry import DEFAULT_REGISTRY, ApiKeyOpt, JsonOpt, RegistryOpt, call_registry, time_text

__all__ = ["keys_app"]

keys_app = typer.Typer(help="API keys: who may call what.", no_args_is_help=True)

console = Console()


def _access(channel: Any) -> Any:
    return access_service_pb2_grpc.AccessServiceStub(channel)


def _print_json(message: Any) -> None:
    sys.stdout.write(json_format.MessageToJson(message, preserving_proto_field_name=True) + "\n")


def _describe(key: pb.ApiKey) -> str:
    limits = []
    if key.rate_per_second:
        limits.append(f"{key.rate_per_second:g}/s")
    if key.max_concurrency:
        limits.append(f"{key.max_concurrency} in flight")
    return ", ".join(limits) or "-"


def _show_token(key: pb.ApiKey, token: str) -> None:
    console.print(f"key [bold]{key.name}[/] ({key.key_id}), grants: {' '.join(key.grants)}")
    console.print("token (shown once; the registry keeps only its hash):")
    sys.stdout.write(token + "\n")


@keys_app.command("create")
def keys_create(
    name: str,
    grant: Annotated[
        list[str],
        typer.Option(
            "--grant", "-g", help="A grant, repeatable: predict:fraud-*, metadata:*, monitor.read, admin."
        ),
    ],
    ttl_s: Annotated[int, typer.Option("--ttl", min=0, help="Seconds until the key expires; 0: never.")] = 0,
    rate: Annotated[float, typer.Option(min=0, help="Requests per second at the gateway; 0: default.")] = 0.0,
    concurrency: Annotated[int, typer.Option(min=0, help="Calls in flight at the gateway; 0: default.")] = 0,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Make a key and print its token (once)."""
    request = pb.CreateApiKeyRequest(
        name=name, grants=grant, ttl_seconds=ttl_s, rate_per_second=rate, max_concurrency=concurrency
    )
    response = call_registry(registry, api_key, lambda s, md: _access(s).CreateApiKey(request, metadata=md))
    if as_json:
        _print_json(response)
    else:
        _show_token(response.key, response.token)


@keys_app.command("list")
def keys_list(
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Every key: active, expired and revoked (never a secret)."""
    response = call_registry(
        registry, api_key, lambda s, md: _access(s).ListApiKeys(pb.ListApiKeysRequest(), metadata=md)
    )
    if as_json:
        _print_json(response)
        return
    table = Table(title="API keys")
    for column in ("id", "name", "grants", "created", "expires", "revoked", "limits", "by"):
        table.add_column(column)
    for key in response.keys:
        table.add_row(
            key.key_id,
            key.name,
            " ".join(key.grants),
            time_text(key.create_time),
            time_text(key.expire_time),
            time_text(key.revoke_time),
            _describe(key),
            key.created_by,
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key id, or the name of an active key.")],
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Refuse a key from now on, everywhere within about a second."""
    request = pb.RevokeApiKeyRequest(key=key)
    response = call_registry(registry, api_key, lambda s, md: _access(s).RevokeApiKey(request, metadata=md))
    if as_json:
        _print_json(response)
    else:
        console.print(f"revoked [bold]{response.key.name}[/] ({response.key.key_id})")


@keys_app.command("rotate")
def keys_rotate(
    key: Annotated[str, typer.Argument(help="The key id, or the name of an active key.")],
    overlap_s: Annotated[
        int, typer.Option("--overlap", min=0, help="Seconds the old key keeps working; 0: revoked at once.")
    ] = 0,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Make a new key with the same name, grants and limits; revoke the old one after OVERLAP."""
    request = pb.RotateApiKeyRequest(key=key, overlap_seconds=overlap_s)
    response = call_registry(registry, api_key, lambda s, md: _access(s).RotateApiKey(request, metadata=md))
    if as_json:
        _print_json(response)
    else:
        console.print(
            f"old key {response.previous.key_id} is refused from {time_text(response.previous.revoke_time)}"
        )
        _show_token(response.key, response.token)
