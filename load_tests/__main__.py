"""`python -m load_tests run SCENARIO [--start-cluster]`."""

from load_tests.cli import app

app()
