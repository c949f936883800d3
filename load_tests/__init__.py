"""Locust load tests for Modelyard: a gRPC user, scenarios, SLO gates and their runner."""
