"""Measure stepvault against DBOS and LangGraph, side by side, in one run.

    pip install -e '.[bench]'
    python benchmarks/bench.py                  # the default figures (about 5 minutes)
    python benchmarks/bench.py --quick          # a smoke run
    python benchmarks/bench.py --out docs/      # also write the table and plot for the docs

Each engine run happens in a fresh process and a fresh temporary folder, so one
engine's caches and globals never help another. Prints one table; writes a JSON
file and a PNG plot of cost per step against step number.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_LIMIT = 1000
"""Peers run up to this many steps: LangGraph stores O(N^2) bytes (7.7 GB at 10,000)."""


def child(engine: str, n: int, size: int) -> dict[str, Any]:
    """Run one engine in a new process and return its JSON result."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import engines; "
        "print(json.dumps(engines.run_in_temp(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(HERE), engine, str(n), str(size)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{engine} N={n} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def step_costs(marks: list[float]) -> list[float]:
    """Seconds between consecutive step starts: what each step cost, engine included."""
    return [after - before for before, after in itertools.pairwise(marks)]


def window_median(costs: list[float], center: int, width: int = 50) -> float:
    """Median cost of the steps around ``center``: one step is too noisy alone."""
    low = max(0, center - width // 2)
    return statistics.median(costs[low : low + width])


def measure_loops(
    engines: list[str], sizes: list[int], runs: int, output: int
) -> list[dict[str, Any]]:
    """Per-step cost of every engine at every N, ``runs`` times each.

    The runs are interleaved (every engine once, then every engine again): a
    machine whose speed drifts over minutes then slows every engine alike, and the
    ratios between them hold.
    """
    rows = []
    for n in sizes:
        chosen = [e for e in engines if n <= PEER_LIMIT or not e.startswith(("langgraph", "dbos"))]
        measured: dict[str, list[dict[str, Any]]] = {engine: [] for engine in chosen}
        for _ in range(runs):
            for engine in chosen:
                measured[engine].append(child(engine, n, output))
        for engine in chosen:
            results = measured[engine]
            means = []
            for result in results:
                costs = step_costs(result["marks"])
                means.append(sum(costs) / len(costs))
            best = results[means.index(statistics.median_low(means))]
            rows.append(
                {
                    "engine": engine,
                    "n": n,
                    "output_bytes": output,
                    "per_step_ms": statistics.median(means) * 1000,
                    "min_ms": min(means) * 1000,
                    "max_ms": max(means) * 1000,
                    "bytes_per_step": best["bytes"] / n,
                    "costs": step_costs(best["marks"]),
                }
            )
            cost = rows[-1]["per_step_ms"]
            print(f"  {engine:<26} N={n:<6} {cost:.3f} ms/step", file=sys.stderr)
    return rows


def measure_restart(sessions: int, steps: int) -> dict[str, float]:
    """Time to the first step after resume_all over many sessions; time to load a long one."""
    script = HERE / "restart.py"
    done = subprocess.run(
        [sys.executable, str(script), str(sessions), str(steps)],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def versions() -> dict[str, str]:
    """Name every package whose speed is on the table."""
    found = {"python": platform.python_version()}
    for package in ("stepvault", "dbos", "langgraph", "langgraph-checkpoint-sqlite", "pydantic"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


FLOOR_OF = {
    "stepvault sqlite": "floor sqlite (one commit)",
    "floor sqlite (one commit)": "floor sqlite (one commit)",
    "stepvault postgres": "floor postgres (one commit)",
    "floor postgres (one commit)": "floor postgres (one commit)",
}
"""Each SQL store is compared with its own database's commit; the rest with the file floor."""
FILE_FLOOR = "floor (append+fdatasync)"


def table(rows: list[dict[str, Any]], floors: dict[tuple[str, int], float]) -> str:
    """Render the loop figures as a Markdown table; ``floors`` by (floor engine, N)."""
    lines = [
        "| engine | N | ms/step (median) | min-max | overhead vs no engine | x its floor "
        "| bytes/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        n = row["n"]
        overhead = row["per_step_ms"] - floors.get(("baseline", n), 0.0)
        floor = floors.get((FLOOR_OF.get(row["engine"], FILE_FLOOR), n))
        ratio = row["per_step_ms"] / floor if floor else float("nan")
        lines.append(
            f"| {row['engine']} | {n:,} | {row['per_step_ms']:.3f} | "
            f"{row['min_ms']:.3f}-{row['max_ms']:.3f} | {overhead:.3f} | {ratio:.2f} | "
            f"{row['bytes_per_step']:,.0f} |"
        )
    return "\n".join(lines)


def postgres_reachable() -> bool:
    """Tell whether the benchmark's PostgreSQL server answers (its rows are skipped if not)."""
    script = (
        "import asyncio, asyncpg, sys; sys.path.insert(0, sys.argv[1]); import engines; "
        "asyncio.run(asyncio.wait_for(asyncpg.connect(engines.PG_URL), 5))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(HERE)], capture_output=True, check=False, timeout=60
    )
    return done.returncode == 0


def measure_concurrency(
    sessions: int, steps: int, setups: list[tuple[str, int]]
) -> list[dict[str, Any]]:
    """Checkpoints per second with ``sessions`` sessions of ``steps`` steps at once.

    Each setup is (store, runner processes sharing it).
    """
    rows = []
    for store, processes in setups:
        done = subprocess.run(
            [
                sys.executable,
                str(HERE / "concurrency.py"),
                str(sessions),
                str(steps),
                store,
                str(processes),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=3600,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rate = rows[-1]["checkpoints_per_s"]
        print(f"  concurrency {store:<14} x{processes} {rate:,.0f}/s", file=sys.stderr)
    return rows


def concurrency_table(rows: list[dict[str, Any]]) -> str:
    """Render the concurrency figures as a Markdown table."""
    lines = [
        "| store | runner processes | sessions x steps | checkpoints | seconds "
        "| durable checkpoints/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['store']} | {r['processes']} | {r['sessions']:,} x {r['steps']} | "
        f"{r['checkpoints']:,} | {r['seconds']:.2f} | {r['checkpoints_per_s']:,.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Draw cost per step against step number for the largest N of each engine."""
    import matplotlib  # noqa: PLC0415  # only the harness needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    largest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["engine"] != "baseline" and row["n"] >= largest.get(row["engine"], {"n": 0})["n"]:
            largest[row["engine"]] = row
    figure, axes = plt.subplots(figsize=(9, 5))
    for engine, row in sorted(largest.items()):
        costs = row["costs"]
        width = max(1, len(costs) // 100)
        smooth = [window_median(costs, i, width) * 1000 for i in range(0, len(costs), width)]
        axes.plot(range(0, len(costs), width), smooth, label=f"{engine} (N={row['n']:,})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("step number")
    axes.set_ylabel("cost of the step, ms (rolling median)")
    axes.set_title("Durable cost per step against step number")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    """Run the figures, print the table, write JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output-bytes", type=int, default=512)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = [10, 100] if args.quick else [10, 100, 1000, 10000]
    runs = 1 if args.quick else args.runs
    engines = [
        "baseline",
        FILE_FLOOR,
        "floor (overwrite+fdatasync)",
        "stepvault file",
        "floor sqlite (one commit)",
        "stepvault sqlite",
        "langgraph sqlite sync",
        "dbos sqlite",
    ]
    if postgres_reachable():
        engines += ["floor postgres (one commit)", "stepvault postgres"]
    else:
        print("  PostgreSQL not reachable: its rows are skipped", file=sys.stderr)
    started = time.time()
    rows = measure_loops(engines, sizes, runs, args.output_bytes)
    big = measure_loops([FILE_FLOOR, "stepvault file"], [100], runs, 100 * 1024)
    floors = {(r["engine"], r["n"]): r["per_step_ms"] for r in rows if "floor" in r["engine"]}
    floors |= {("baseline", r["n"]): r["per_step_ms"] for r in rows if r["engine"] == "baseline"}
    big_floors = {(r["engine"], r["n"]): r["per_step_ms"] for r in big if "floor" in r["engine"]}
    restart = measure_restart(200 if args.quick else 10000, 100 if args.quick else 10000)
    setups = [(store, 1) for store in ("file", "file-batch", "sqlite", "sqlite-batch")]
    setups += [("file-batch", 2), ("sqlite-batch", 2)]  # the way past one event loop
    burst = measure_concurrency(100 if args.quick else 1000, 20, setups)

    growth = {}
    for row in rows:
        # Only over a long run: a quick run's longest session has no step 600.
        if row["n"] == max(sizes) >= 1000 and row["engine"].startswith("stepvault"):
            costs = row["costs"]
            # Medians over 500 steps: one step's cost is noise; the very last is not a
            # step like the others (it includes giving the lease back), so it is left out.
            last = statistics.median(costs[-501:-1])
            growth[row["engine"]] = last / statistics.median(costs[100:600])
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "versions": versions(),
        "loops": [{k: v for k, v in row.items() if k != "costs"} for row in rows + big],
        "growth_last_vs_step_100": growth,
        "restart": restart,
        "concurrency": burst,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(
        [
            table(rows, floors),
            f"100 KB outputs, N=100:\n\n{table(big, big_floors)}",
            f"Many sessions at once:\n\n{concurrency_table(burst)}",
            "growth (cost of the last steps / cost around step 100): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in growth.items()),
            "restart: " + ", ".join(f"{k} {v:.1f}" for k, v in restart.items()),
        ]
    )
    print(text)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench.md").write_text(text + "\n")
    plot(rows, args.out / "per_step.png")
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'per_step.png'}", file=sys.stderr)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
