"""`python -m modelyard_cli ...`: the `modelyard` command without its console script (the
TLS Compose file's `certs` service runs it this way)."""

from modelyard_cli.app import app

app()
