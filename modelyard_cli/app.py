"""The `modelyard` command line."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modelyard.telemetry import configure_logging
from modelyard.tls import CLIENT_KIND, SERVICE_KINDS, LocalCA
from modelyard_cli import events as cli_events
from modelyard_cli import keys as cli_keys
from modelyard_cli import optimize as cli_optimize
from modelyard_cli import registry as cli_registry
from modelyard_cli import top as cli_top
from modelyard_cli.local_cluster import LocalCluster

app = typer.Typer(help="Modelyard: a gRPC inference cluster for PyTorch models.", no_args_is_help=True)
console = Console()
cli_registry.add_to(app)
app.add_typer(cli_keys.keys_app, name="keys")
app.command(name="top")(cli_top.top)
app.command(name="events")(cli_events.events)
app.command(name="optimize")(cli_optimize.optimize)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def load(ctx: typer.Context) -> None:
    """Locust load-test scenarios with SLO gates (`modelyard load --help`)."""
    from load_tests.cli import app as load_app  # locust (gevent) is imported only for this

    load_app(args=ctx.args, prog_name="modelyard load")


@app.callback()
def main() -> None:
    """Modelyard: a gRPC inference cluster for PyTorch models."""


@app.command()
def up(
    demo: Annotated[bool, typer.Option(help="Register, promote and query the demo model.")] = False,
    redis_url: Annotated[
        str | None, typer.Option(help="Use this Redis instead of starting an embedded one.")
    ] = None,
    model_servers: Annotated[int, typer.Option(min=1, help="How many model servers to start.")] = 1,
    data_dir: Annotated[Path, typer.Option(help="Registry store, Redis files and logs.")] = Path("var"),
    free_ports: Annotated[bool, typer.Option(help="Bind free ports instead of 50051, 50061, ...")] = False,
    exit_after_demo: Annotated[
        bool, typer.Option(help="Stop the cluster once the demo has run (for scripts).")
    ] = False,
    tls: Annotated[
        bool,
        typer.Option(
            help="Make a local CA and per-service certificates in DATA_DIR/tls and run every "
            "service with mTLS; clients get the CA and a client certificate (see cluster.json)."
        ),
    ] = False,
    gateway_mtls: Annotated[
        bool, typer.Option(help="With --tls, the gateway too requires client certificates.")
    ] = False,
) -> None:
    """Start the whole cluster locally and keep it running until Ctrl-C."""
    configure_logging("WARNING")
    cluster = LocalCluster(
        data_dir=data_dir.resolve(),
        redis_url=redis_url,
        ports="free" if free_ports else "default",
        model_servers=model_servers,
        tls=tls,
        gateway_client_auth=gateway_mtls,
    )
    code = asyncio.run(_up(cluster, demo, exit_after_demo))
    raise typer.Exit(code)


async def _up(cluster: LocalCluster, demo: bool, exit_after_demo: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with console.status("starting Redis, registry, monitor, model servers, gateway..."):
            await cluster.start()
        _print_cluster(cluster)
        if demo:
            await _run_demo(cluster)
        if exit_after_demo:
            return 0
        console.print("\nThe cluster is running. Press [bold]Ctrl-C[/] to stop it.")
        while not stop.is_set():
            # A child that dies is started again (with backoff); only one that keeps failing
            # at start-up stops the cluster (RuntimeError, below).
            for note in await cluster.supervise():
                console.print(f"[yellow]{note}[/]")
            try:
                async with asyncio.timeout(1.0):
                    await stop.wait()
            except TimeoutError:
                pass
        return 0
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        with console.status("stopping..."):
            await cluster.stop()
        console.print("stopped.")


@app.command()
def certs(
    directory: Annotated[Path, typer.Argument(help="Where the CA and the certificates go.")],
    hosts: Annotated[
        str,
        typer.Option(
            help="Comma-separated DNS names and IPs every certificate names (the hosts services "
            "are dialled by, e.g. compose's service names)."
        ),
    ] = "127.0.0.1,localhost",
    days: Annotated[float, typer.Option(min=0.01, help="Validity of the certificates.")] = 90.0,
    kinds: Annotated[
        str, typer.Option(help="Which certificates to issue (service kinds, client, redis).")
    ] = ",".join((*SERVICE_KINDS, CLIENT_KIND, "redis")),
) -> None:
    """Make (or reuse) a CA in DIRECTORY and issue one certificate per kind, naming the kind
    (spiffe://modelyard/<kind>) and HOSTS; run again to rotate (services reload them)."""
    ca = LocalCA.load_or_create(directory)
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    for kind in (k.strip() for k in kinds.split(",") if k.strip()):
        issued = ca.issue(kind, hosts=names, days=days)
        console.print(f"{kind}: {issued.cert_file} (key {issued.key_file})")
    console.print(f"CA: {ca.cert_file} (its key {directory / 'ca-key.pem'} signs certificates: keep it safe)")


def _print_cluster(cluster: LocalCluster) -> None:
    table = Table(title="Modelyard cluster")
    table.add_column("service")
    table.add_column("gRPC")
    table.add_column("/metrics")
    table.add_column("log")
    redis_url = re.sub(r":[^:/@]+@", ":***@", cluster.redis_url)
    table.add_row("redis", redis_url, "-", str(cluster.data_dir / "redis"))
    for child in cluster.children:
        table.add_row(child.name, child.address, child.metrics_url or "-", str(child.log_path))
    console.print(table)
    console.print(
        f"addresses, /metrics URLs and Redis URL for tools (e.g. the load tests): {cluster.cluster_file}"
    )
    if cluster.client_tls is not None:
        t = cluster.client_tls
        console.print(
            f"TLS on: CA {t.ca_file}, client certificate {t.cert_file} (key {t.key_file}); the CLI "
            f"finds them through {cluster.cluster_file}. For example:\n"
            f"  grpcurl -cacert {t.ca_file} -cert {t.cert_file} -key {t.key_file} "
            f"{cluster.gateway_address} list",
            soft_wrap=True,
        )
    if cluster.access == "enforce":
        key = cluster.api_key_file
        console.print(
            f"access control on: every call needs an API key. The admin key is in {key} (owner-only);"
            " the CLI and the load tests find it there. For example:\n"
            f'  grpcurl -plaintext -H "authorization: Bearer $(cat {key})" {cluster.gateway_address} list\n'
            "  modelyard keys create ci --grant 'predict:demo' --grant 'metadata:*'",
            soft_wrap=True,
        )


async def _run_demo(cluster: LocalCluster) -> None:
    import torch  # the CLI loads torch only for the demo

    from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
    from modelyard_cli.local_cluster import tool_token

    module, artifact = build_demo_model()
    # The demo's registry calls carry its own service token, so the audit log and the alias
    # history name it (service:demo), not the admin key.
    secret = cluster.secret_file if cluster.access == "enforce" else None
    version = await register_model(
        cluster.address_of("registry"),
        "demo",
        artifact,
        demo_signature(),
        description="demo MLP 64-256-256-10",
        tls=cluster.client_tls,
        token=tool_token(secret, "demo") or cluster.api_key,
    )
    console.print(f"\nregistered [bold]demo[/] v{version} and pointed [bold]production[/] at it")
    generator = torch.Generator().manual_seed(1234)
    inputs = [torch.randn(n, 64, generator=generator) for n in (1, 2, 3)]
    answers = await predict_until_served(
        cluster.gateway_address, "demo", inputs, module, tls=cluster.client_tls, token=cluster.api_key
    )
    table = Table(title=f"predictions through the gateway ({cluster.gateway_address})")
    table.add_column("rows")
    table.add_column("served by")
    table.add_column("argmax per row")
    table.add_column("max |Δ| vs in-process torch")
    for x, answer in zip(inputs, answers, strict=True):
        delta = (answer.output - answer.expected).abs().max().item()
        table.add_row(
            str(x.shape[0]),
            f"demo v{answer.version}",
            str(answer.output.argmax(dim=1).tolist()),
            f"{delta:.2e}",
        )
    console.print(table)
