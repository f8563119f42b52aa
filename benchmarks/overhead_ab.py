"""Interleaved before/after comparison of `benchmarks/overhead.py` cells between two trees.

```sh
git worktree add --detach ../before <commit>          # or: git archive <commit> | tar -x -C ...
python benchmarks/overhead_ab.py before=../before after=. --rounds 6 --json out/ab.json
python benchmarks/overhead_ab.py before=../before after=. --rounds 6 --cpu user
```

One downstream process per mode (plain, TLS) serves both sides; each round runs every cell in a
fresh client process of each side (`PYTHONPATH=<tree>/packages/core`, that tree's
`overhead.py`), the order of the sides flipped every round, so both meet the same server and,
on average, the same machine load. `--cpu user` counts user CPU only: the kernel's share of a
request (waking the server process) grows with the machine's load and hides small changes
of the library's own cost. Prints median [min-max] per cell and side, and the after/before
ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from toolpool.testing import ServiceSpec, spawn_downstream

CHILD = r"""
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import overhead
url, ca, mode, cells, cpu, seconds = sys.argv[2:8]
if cpu == "user":
    time.process_time = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_utime
rows = []
for conc, name in json.loads(cells):
    row = asyncio.run(overhead._run_client(name, url, None, ca or None, conc, float(seconds)))
    row["mode"] = mode
    rows.append(row)
print(json.dumps(rows))
"""


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sides = [side.split("=", 1) for side in args.sides]
    cells = [
        (int(c), name) for c in args.concurrency.split(",") for name in args.clients.split(",")
    ]
    env = dict(
        os.environ,
        CREWAI_DISABLE_TELEMETRY="true",
        OTEL_SDK_DISABLED="true",
        ANONYMIZED_TELEMETRY="false",
    )
    rows: list[dict[str, Any]] = []
    modes = ["plain", "tls"] if args.tls == "both" else [args.tls]
    for mode in modes:
        with spawn_downstream({"api": ServiceSpec(require_auth=False)}, tls=mode == "tls") as ds:
            ca = ds.ca_pem_path if mode == "tls" else ""
            for rnd in range(args.rounds):
                for name, tree in sides if rnd % 2 == 0 else sides[::-1]:
                    child = [sys.executable, "-c", CHILD, tree, ds.url("api"), ca, mode]
                    child += [json.dumps(cells), args.cpu, str(args.seconds)]
                    done = subprocess.run(
                        child,
                        env=dict(env, PYTHONPATH=str(Path(tree) / "packages" / "core")),
                        capture_output=True,
                        text=True,
                        timeout=60 + 5 * args.seconds * len(cells),
                        check=False,
                    )
                    if done.returncode != 0:
                        raise SystemExit(f"{name} failed:\n{done.stderr}")
                    for row in json.loads(done.stdout.strip().splitlines()[-1]):
                        row.update(side=name, round=rnd, load=os.getloadavg()[0])
                        rows.append(row)
                    print(f"{mode} round {rnd} {name} done", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict[str, Any]], names: list[str], cpu: str) -> str:
    before, after = names
    cells: dict[tuple[str, int, str], dict[str, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        cells[(row["mode"], row["concurrency"], row["client"])][row["side"]].append(row)
    kind = "user CPU" if cpu == "user" else "client CPU"

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"

    lines = [
        f"| mode | conc. | client | req/s {before} | req/s {after} | {after}/{before} "
        f"| {kind} µs/req {before} | {kind} µs/req {after} | {after}/{before} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cells):
        rps = {s: [r["requests_per_s"] for r in cells[key][s]] for s in names}
        us = {s: [r["cpu_us_per_request"] for r in cells[key][s]] for s in names}
        ratio = statistics.median(rps[after]) / statistics.median(rps[before])
        cpu_ratio = statistics.median(us[after]) / statistics.median(us[before])
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {spread(rps[before])} | {spread(rps[after])} "
            f"| {ratio:.2f} | {spread(us[before])} | {spread(us[after])} | {cpu_ratio:.2f} |"
        )
    loads = [r["load"] for r in rows]
    lines.append("")
    lines.append(
        f"{len(rows) // (2 * len(cells))} runs per cell and side; "
        f"1-minute load average during the runs {min(loads):.1f}-{max(loads):.1f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sides", nargs=2, metavar="NAME=TREE", help="before, then after")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", default="1,100")
    parser.add_argument("--clients", default="httpx+toolpool,toolpool-lean")
    parser.add_argument("--tls", choices=["both", "plain", "tls"], default="both")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per cell")
    parser.add_argument("--cpu", choices=["all", "user"], default="all")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(render(rows, [side.split("=", 1)[0] for side in args.sides], args.cpu))


if __name__ == "__main__":
    main()
