"""The monitor's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ALERTS_FIRING",
    "ALERTS_NO_DATA",
    "CANARY_DECISIONS",
    "INPUT_DRIFT",
    "INPUT_DRIFT_P",
    "INPUT_PSI",
    "SCRAPES",
    "SCRAPE_SECONDS",
]

SCRAPES = Counter("modelyard_monitor_scrapes", "Collection rounds completed.")
SCRAPE_SECONDS = Histogram(
    "modelyard_monitor_scrape_seconds",
    "Time of one collection round: scrape every service, evaluate rules and canaries.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
ALERTS_FIRING = Gauge("modelyard_monitor_alerts_firing", "Alerts firing now.")
ALERTS_NO_DATA = Gauge(
    "modelyard_monitor_alerts_no_data", "Alerts that fired and whose expression has had no data since."
)
INPUT_DRIFT = Gauge(
    "modelyard_monitor_input_drift",
    "Largest standardised mean shift of an input feature against the model's baseline.",
    ["model", "version"],
)
INPUT_PSI = Gauge(
    "modelyard_monitor_input_psi",
    "Largest population stability index of an input feature against the version's registry baseline.",
    ["model", "version"],
)
INPUT_DRIFT_P = Gauge(
    "modelyard_monitor_input_drift_p",
    "Smallest p-value of the per-feature input drift tests, corrected for their number (Holm); "
    "NaN when no feature could be tested.",
    ["model", "version"],
)
CANARY_DECISIONS = Counter(
    "modelyard_monitor_canary_decisions", "Canary analysis decisions, by action.", ["action"]
)
