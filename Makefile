# The usual targets; ./dev.sh does the work (it also sets up .venv on a fresh machine).
.PHONY: setup up test unit integration e2e protos lint clean

setup:
	./dev.sh setup

up:
	./dev.sh up

test:
	./dev.sh test

unit: setup
	.venv/bin/python -m pytest tests/unit

integration: setup
	.venv/bin/python -m pytest tests/integration

e2e: setup
	.venv/bin/python -m pytest tests/e2e

protos:
	./dev.sh protos

lint: setup
	.venv/bin/buf lint
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy modelyard modelyard_cli gateway model_server registry_service monitor_service load_tests

clean:
	rm -rf var .pytest_cache .ruff_cache .mypy_cache
