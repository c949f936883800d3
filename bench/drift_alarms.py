"""Drift alarms: how often the drift rule fires on traffic from the baseline's own
distribution, and how fast it fires on a +1σ shift of one feature.

Simulated time, real code: a version registered with a 32-feature baseline
(`modelyard.baseline.compute_baseline` of a normal sample); `--rate` requests per second with
Poisson arrivals, one in `--sample-every` sampled as the model servers do (counted), each
sampled request's items counted by the model server's own `InputBinCounts` and
`InputMoments`; every `scrape_interval_s` their /metrics text is parsed by the collector's
`parse_snapshot`, kept as the collector keeps snapshots (`ProcessView`, the `window_s`
window), turned into figures by `_version_stats`, scored by `DriftDetector` and evaluated by
`AlertManager` with the drift rule of the rule file (deploy/monitor/rules.yaml). The window,
the scrape interval and `drift_min_items` are `MonitorSettings`' defaults.

For comparison it evaluates, on the same figures, the rule of the issue, `input_psi > 0.25`,
with the PSI as it was computed before (fractions floored at 1e-4, no smoothing), and the
same rule on today's smoothed PSI.

    .venv/bin/python bench/drift_alarms.py [--hours 1] [--seeds 1] [--shift-trials 20]
                                           [--out bench/results/drift_alarms.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest

from model_server.stats import InputBinCounts, InputMoments
from modelyard.baseline import compute_baseline, population_stability_index
from monitor_service.alerting import Alert, AlertManager, AlertState, WebhookNotifier
from monitor_service.collector import ProcessView, Snapshot, VersionStats, _version_stats, parse_snapshot
from monitor_service.drift import DriftDetector
from monitor_service.rules import AlertRule, load_rule_file
from monitor_service.settings import MonitorSettings

ROOT = Path(__file__).resolve().parent.parent
MODEL, VERSION, INPUT = "bench", 1, "x"


@dataclass
class Firings:
    """Transitions to firing per rule, and when."""

    times: dict[str, list[float]] = field(default_factory=dict)

    async def record(self, alert: Alert) -> None:
        if alert.state is AlertState.FIRING:
            self.times.setdefault(alert.name, []).append(alert.fired_at or 0.0)


class Simulation:
    """One simulated model version, its model server's counters, and the monitor's path."""

    def __init__(self, args: argparse.Namespace, rules: list[AlertRule], seed: int) -> None:
        self.args = args
        self.settings = MonitorSettings()
        self.rng = np.random.default_rng(seed)
        sample = torch.from_numpy(self.rng.standard_normal((args.baseline_items, args.features)))
        baselines = compute_baseline({INPUT: sample}, bins=args.bins)
        self.registry = CollectorRegistry()
        self.bins = InputBinCounts()
        self.moments = InputMoments()
        self.bins.register(MODEL, VERSION, baselines)
        self.registry.register(self.bins)
        self.registry.register(self.moments)
        self.process = ProcessView(("bench", 0.0), start_time=0.0)
        self.detector = DriftDetector(min_items=self.settings.drift_min_items)
        self.detector.set_registry_baselines(MODEL, VERSION, baselines)
        self.fractions = [list(f.bin_fractions) for f in baselines[0].features]
        self.rules = rules
        self.firings = Firings()
        self.alerts = AlertManager(WebhookNotifier([]), on_change=self.firings.record)
        self.seen = 0
        self.now = 0.0
        self.shift = 0.0
        self.windows = 0
        self.smallest_p = 1.0
        self.items: list[float] = []

    async def step(self) -> VersionStats:
        """One scrape interval of traffic, then one collection round."""
        interval = self.settings.scrape_interval_s
        requests = int(self.rng.poisson(self.args.rate * interval))
        sampled = (self.seen + requests) // self.args.sample_every
        self.seen = (self.seen + requests) % self.args.sample_every
        if sampled:
            rows = self.rng.standard_normal((sampled * self.args.items_per_request, self.args.features))
            rows[:, 0] += self.shift
            self.bins.count((MODEL, str(VERSION)), INPUT, rows)
            self.moments.add((MODEL, str(VERSION)), INPUT, rows)
        self.now += interval
        values = parse_snapshot(generate_latest(self.registry).decode())
        # As Collector.scrape keeps them: the newest, and the one at or before the window's start.
        self.process.snapshots.append(Snapshot(self.now, values))
        window = self.settings.window_s
        while len(self.process.snapshots) > 2 and self.process.snapshots[1].time <= self.now - window:
            self.process.snapshots.popleft()
        delta = self.process.delta(self.now - window)
        grouped = {(what, detail): v for (what, model, _version, detail), v in delta.items() if model}
        figures = _version_stats((MODEL, VERSION), grouped, window)
        figures.aliases = ["production"]
        self.detector.apply({(MODEL, VERSION): figures})
        if not math.isnan(figures.input_drift_p):
            self.windows += 1
            self.smallest_p = min(self.smallest_p, figures.input_drift_p)
            self.items.append(min(sum(c) for c in figures.input_bins.values()))
        # The rule on the PSI as it was (1e-4 floor) and on today's, same figures.
        old_psi = math.nan
        for key, counts in figures.input_bins.items():
            if sum(counts) >= self.settings.drift_min_items:
                column = int(key.rpartition("/")[2])
                value = population_stability_index(self.fractions[column], counts, smoothing=0.0)
                old_psi = value if math.isnan(old_psi) else max(old_psi, value)
        old = replace(figures, input_psi=old_psi)
        await self.alerts.evaluate(
            self.rules, {(MODEL, VERSION): figures, ("bench-floored-psi", VERSION): old}, self.now
        )
        return figures


def comparison_rules(drift_rule: AlertRule) -> list[AlertRule]:
    return [
        drift_rule,
        AlertRule("PSIOverQuarter", "input_psi", 0.25, model=MODEL),
        AlertRule("FlooredPSIOverQuarter", "input_psi", 0.25, model="bench-floored-psi"),
    ]


async def null_hours(args: argparse.Namespace, drift_rule: AlertRule) -> dict[str, Any]:
    per_seed = []
    for seed in range(args.seeds):
        simulation = Simulation(args, comparison_rules(replace(drift_rule, model=MODEL)), seed)
        for _ in range(int(args.hours * 3600 / simulation.settings.scrape_interval_s)):
            await simulation.step()
        firings = simulation.firings.times
        per_seed.append(
            {
                "seed": seed,
                "drift_rule_firings": len(firings.get(drift_rule.name, [])),
                "psi_over_quarter_firings": len(firings.get("PSIOverQuarter", [])),
                "floored_psi_over_quarter_firings": len(firings.get("FlooredPSIOverQuarter", [])),
                "floored_psi_firings_first_17_min": sum(
                    t <= 17 * 60 for t in firings.get("FlooredPSIOverQuarter", [])
                ),
                "windows_tested": simulation.windows,
                "smallest_input_drift_p": simulation.smallest_p,
                "sampled_items_per_window_median": statistics.median(simulation.items),
            }
        )
        print(json.dumps(per_seed[-1]), flush=True)
    hours = float(args.hours * args.seeds)

    def per_hour(name: str) -> float:
        return float(sum(r[name] for r in per_seed)) / hours

    return {
        "hours": hours,
        "drift_rule_firings": sum(r["drift_rule_firings"] for r in per_seed),
        "drift_rule_firings_per_hour": per_hour("drift_rule_firings"),
        "psi_over_quarter_firings_per_hour": per_hour("psi_over_quarter_firings"),
        "floored_psi_over_quarter_firings_per_hour": per_hour("floored_psi_over_quarter_firings"),
        "smallest_input_drift_p": min(r["smallest_input_drift_p"] for r in per_seed),
        "per_seed": per_seed,
    }


async def shift_trials(args: argparse.Namespace, drift_rule: AlertRule) -> dict[str, Any]:
    delays: list[float] = []
    missed = 0
    for trial in range(args.shift_trials):
        simulation = Simulation(args, [replace(drift_rule, model=MODEL)], 10_000 + trial)
        interval = simulation.settings.scrape_interval_s
        for _ in range(int(args.warm_up_s / interval)):  # a full window of identical traffic first
            await simulation.step()
        assert drift_rule.name not in simulation.firings.times, "fired before the shift"
        started = simulation.now
        simulation.shift = args.shift
        while drift_rule.name not in simulation.firings.times and simulation.now - started < args.give_up_s:
            await simulation.step()
        fired = simulation.firings.times.get(drift_rule.name)
        if fired:
            delays.append(fired[0] - started)
        else:
            missed += 1
    return {
        "shift_sigma": args.shift,
        "trials": args.shift_trials,
        "missed_within_s": {"s": args.give_up_s, "count": missed},
        "time_to_fire_s": {
            "median": statistics.median(delays) if delays else None,
            "max": max(delays) if delays else None,
            "min": min(delays) if delays else None,
            "within_60_s": sum(d <= 60 for d in delays) / args.shift_trials,
        },
        "delays_s": delays,
    }


def drift_rule_of(args: argparse.Namespace) -> AlertRule:
    (rule,) = [r for r in load_rule_file(args.rules).rules if r.metric == "input_drift_p"]
    if args.threshold is not None:
        rule = replace(rule, threshold=args.threshold)
    if args.for_s is not None:
        rule = replace(rule, for_s=args.for_s)
    return rule


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rule = drift_rule_of(args)
    settings = MonitorSettings()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "bench": "drift_alarms",
        "python": platform.python_version(),
        "traffic": {
            "requests_per_second": args.rate,
            "sample_every": args.sample_every,
            "items_per_request": args.items_per_request,
            "features": args.features,
            "bins": args.bins,
            "baseline_items": args.baseline_items,
        },
        "monitor": {
            "window_s": settings.window_s,
            "scrape_interval_s": settings.scrape_interval_s,
            "drift_min_items": settings.drift_min_items,
        },
        "rule": {
            "name": rule.name,
            "metric": rule.metric,
            "op": rule.op,
            "threshold": rule.threshold,
            "for_s": rule.for_s,
            "keep_firing_for_s": rule.keep_firing_for_s,
        },
        "identical_traffic": await null_hours(args, rule),
        "shifted_traffic": await shift_trials(args, rule),
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=float, default=1.0, help="hours of identical traffic per seed")
    parser.add_argument("--seeds", type=int, default=1, help="independent simulated hours runs")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--sample-every", type=int, default=10, help="the model server's default")
    parser.add_argument("--items-per-request", type=int, default=1)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--baseline-items", type=int, default=4000)
    parser.add_argument("--shift", type=float, default=1.0, help="shift of feature 0, in baseline std")
    parser.add_argument("--shift-trials", type=int, default=20)
    parser.add_argument("--warm-up-s", type=float, default=120.0)
    parser.add_argument("--give-up-s", type=float, default=300.0)
    parser.add_argument("--rules", type=Path, default=ROOT / "deploy" / "monitor" / "rules.yaml")
    parser.add_argument("--threshold", type=float, default=None, help="override the rule's threshold")
    parser.add_argument("--for-s", type=float, default=None, help="override the rule's for")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # Every simulated firing would be logged as a warning: the result says it better.
    logging.getLogger("monitor_service").setLevel(logging.ERROR)
    result = asyncio.run(main_async(args))
    summary = {k: v for k, v in result.items() if k not in ("identical_traffic", "shifted_traffic")}
    summary["identical_traffic"] = {k: v for k, v in result["identical_traffic"].items() if k != "per_seed"}
    summary["shifted_traffic"] = {k: v for k, v in result["shifted_traffic"].items() if k != "delays_s"}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
