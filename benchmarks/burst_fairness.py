"""Per-tenant fairness of a 10x burst through each adapter (issue 20), against the previous
admission rule in the same run.

Runs the burst tests (tests/langchain/test_langchain_burst.py, tests/autogen/test_burst.py,
tests/crewai/test_burst.py, `every_call`: 100 parallel tool calls of 4 tenants against a
destination capped at 10, tools that build their own httpx clients, nothing declared) in a
fresh pytest process per repetition, and reads the fairness line each test prints
(`toolpool.testing.tenant_fairness`). Two rules, interleaved run by run:

- `gate`: the library as it is: a tool call is admitted while a connection is free, the rest
  wait at the gate, least-served tenant first;
- `queue-places` (the baseline): the rule before, reproduced by the plugin below: tool calls
  also take the pool's queue places (cap + 2 x cap) in arrival order, then wait at the gate.

Reported per adapter and rule: the max/min ratio of per-tenant p99 (LangChain and AutoGen:
from the burst's start to each call's result; CrewAI: each call's own latency from its body's
start), the max/min ratio of each tenant's last completion rank, the burst's duration
(LangChain, AutoGen: the slowest tenant's p99), as median [min-max] over the runs. The
baseline's run asserts fail on purpose (its fairness is what the tests reject); its
figures are read all the same.

    python benchmarks/burst_fairness.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/langchain/test_langchain_burst.py",
    "tests/autogen/test_burst.py",
    "tests/crewai/test_burst.py",
]
_LINE = re.compile(
    r"^(?P<name>langchain fetch_sync|langchain fetch|autogen|crewai): "
    r"(?:per-call latency p99 s [^;]*max/min (?P<latency>[\d.]+); finishing: )?"
    r"p99 s: (?P<p99>[^(]*)\(max/min (?P<p99_ratio>[\d.]+)\); "
    r"last call's rank: [^(]*\(max/min (?P<rank_ratio>[\d.]+)\); max lead (?P<lead>\d+)",
    re.MULTILINE,
)
ROWS = {
    "langchain fetch": "LangChain, async tool",
    "langchain fetch_sync": "LangChain, sync tool",
    "autogen": "AutoGen, async tool",
    "crewai": "CrewAI, sync tool",
}


class QueuePlacesBaseline:
    """pytest plugin: strict (tool-call) admissions take the pool's queue places too, as
    every admission did before issue 20's fairness change."""

    def pytest_configure(self) -> None:
        from toolpool.resilience import _gate

        room = _gate.AdmissionControl._room_locked

        def _room_locked(
            self: _gate.AdmissionControl, now: float, admission: bool, strict: bool = False
        ) -> int:
            return room(self, now, admission, False)

        _gate.AdmissionControl._room_locked = _room_locked  # type: ignore[method-assign]


def pytest_configure(config: object) -> None:  # loaded with -p benchmarks.burst_fairness
    if os.environ.get("TOOLPOOL_BENCH_RULE") == "queue-places":
        QueuePlacesBaseline().pytest_configure()


def run_once(rule: str) -> dict[str, dict[str, float]]:
    env = dict(os.environ, TOOLPOOL_BENCH_RULE=rule)
    for name, value in {
        "CREWAI_DISABLE_TELEMETRY": "true",
        "OTEL_SDK_DISABLED": "true",
        "ANONYMIZED_TELEMETRY": "false",
    }.items():
        env.setdefault(name, value)
    cmd = [sys.executable, "-m", "pytest", *TESTS, "-q", "-s", "-k", "every_call"]
    cmd += ["-p", "benchmarks.burst_fairness", "-p", "no:cacheprovider"]
    out = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    ).stdout
    found: dict[str, dict[str, float]] = {}
    for m in _LINE.finditer(out):
        p99s = [float(x.split()[-1]) for x in m["p99"].strip().rstrip(",").split(", ")]
        found[m["name"]] = {
            "p99_ratio": float(m["latency"] or m["p99_ratio"]),
            "rank_ratio": float(m["rank_ratio"]),
            "max_lead": float(m["lead"]),
            "duration": max(p99s),
        }
    if len(found) != len(ROWS):
        raise SystemExit(f"expected {len(ROWS)} fairness lines, found {sorted(found)}:\n{out}")
    return found


def _cell(values: list[float], digits: int = 2) -> str:
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    rules = ["gate", "queue-places"]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {r: [] for r in rules}
    for i in range(args.runs):
        for rule in rules:  # interleaved
            runs[rule].append(run_once(rule))
            print(f"run {i + 1} {rule}: done", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    print(
        "| adapter, tool | rule | p99 max/min | last-rank max/min | max lead "
        "| burst s (slowest p99) | p99 max/min per run |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, label in ROWS.items():
        for rule in rules:
            figures = [r[key] for r in runs[rule]]
            ratios = [f["p99_ratio"] for f in figures]
            duration = "-" if key == "crewai" else _cell([f["duration"] for f in figures], 3)
            print(
                f"| {label} | {rule} | {_cell(ratios)} "
                f"| {_cell([f['rank_ratio'] for f in figures])} "
                f"| {_cell([f['max_lead'] for f in figures], 0)} | {duration} "
                f"| {', '.join(f'{x:.2f}' for x in ratios)} |"
            )


if __name__ == "__main__":
    main()
