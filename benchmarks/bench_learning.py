"""Does the demo recipe learn the route on every seed? sabr-demo over N seeds, the held-out table
of each, and the mean and spread per row.

    python benchmarks/bench_learning.py --root runs/learning                     # seeds 0, 1, 2
    python benchmarks/bench_learning.py --root runs/learning --seeds 0,1,2,3,4 --json learning.json
    python benchmarks/bench_learning.py --root runs/oracle --set data.route_tokens=oracle   # a variant

Each seed is one `sabr-demo --workdir ROOT/seed<S> --config.seed=S [--config.KEY=VALUE ...]` run
(the seed sets the walls, which of them are held out, the initialisation, the data order and the
noise); a finished seed's workdir is read, not run again, so an interrupted benchmark resumes.
Per seed it prints the rows of sabr-eval's table and its paired per-wall differences (model minus
shuffled_video, model minus random_clip: mean and bootstrap 95% interval), whether the seed meets
the route-following targets, then mean, standard deviation and range over the seeds per row.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

ROOT = flags.DEFINE_string("root", None, "Where the seeds' workdirs go (ROOT/seed<S>).", required=True)
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "The seeds.")
CONFIG = flags.DEFINE_string("config", None, "A config file for sabr-demo (default: its embedded one).")
SET = flags.DEFINE_multi_string("set", [], "A config override KEY=VALUE for every seed (repeatable).")
JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")

ROWS = ("model", "mean_motion", "random_clip", "shuffled_video")
METRICS = (("movement_mse", "movement MSE", ".4f"), ("route_adherence", "adherence", ".3f"))


def run_seed(seed: int) -> dict:
    """The seed's metrics.json (sabr-demo run in ROOT/seed<S> unless it has finished there)."""
    workdir = os.path.join(ROOT.value, f"seed{seed}")
    metrics = os.path.join(workdir, "eval", "metrics.json")
    summary = os.path.join(workdir, "summary.json")
    if not os.path.isfile(summary):  # (written last by sabr-demo)
        cmd = [sys.executable, "-m", "sabr_jax.cli.demo", "--workdir", workdir, f"--config.seed={seed}"]
        cmd += ["--config", CONFIG.value] if CONFIG.value else []
        cmd += [f"--config.{item}" for item in SET.value]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    with open(metrics) as f:
        result = json.load(f)
    with open(summary) as f:
        result["minutes"] = json.load(f)["minutes"]
    return result


def targets(result: dict) -> dict[str, bool]:
    """The route-following issue's demo targets, for one seed's held-out table."""
    rows, paired = result["rows"], result["paired"]["model - shuffled_video"]
    adherence, mse = rows["model"]["route_adherence"], rows["model"]["movement_mse"]
    return {
        "adherence >= 0.60": adherence >= 0.60,
        "adherence >= shuffled + 0.15": adherence >= rows["shuffled_video"]["route_adherence"] + 0.15,
        "MSE interval vs shuffled below 0": paired["movement_mse"]["high"] < 0,
        "MSE <= 0.5 x mean_motion": mse <= 0.5 * rows["mean_motion"]["movement_mse"],
    }


def interval(d: dict | None) -> str:
    return "null" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def main(argv) -> None:
    del argv
    seeds = [int(s) for s in SEEDS.value]
    results = {s: run_seed(s) for s in seeds}
    lines = [
        f"# sabr-demo over seeds {', '.join(map(str, seeds))}" + (f" with {' '.join(SET.value)}" if SET.value else "")
    ]
    lines += ["", "| seed | row | movement MSE | adherence | minutes |", "|---|---|---|---|---|"]
    for s, r in results.items():
        for row in ROWS:
            v = r["rows"][row]
            lines.append(f"| {s} | {row} | {v['movement_mse']:.4f} | {v['route_adherence']:.3f} | {r['minutes']:.1f} |")
    lines += [
        "",
        "| seed | model - shuffled_video: MSE, adherence | model - random_clip: MSE, adherence | targets met |",
    ]
    lines += ["|---|---|---|---|"]
    for s, r in results.items():
        p = r["paired"]
        met = targets(r)
        cells = [
            f"{interval(p[name]['movement_mse'])}, {interval(p[name]['route_adherence'])}"
            for name in ("model - shuffled_video", "model - random_clip")
        ]
        lines.append(
            f"| {s} | {cells[0]} | {cells[1]} | {sum(met.values())}/{len(met)}: "
            + ", ".join(k for k, ok in met.items() if not ok)
            + " |"
        )
    lines += ["", "| row | movement MSE: mean (sd) [min, max] | adherence: mean (sd) [min, max] |", "|---|---|---|"]
    spread = {}
    for row in ROWS:
        cells = []
        for key, _, spec in METRICS:
            values = [r["rows"][row][key] for r in results.values()]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            spread.setdefault(row, {})[key] = {
                "mean": statistics.mean(values),
                "sd": sd,
                "min": min(values),
                "max": max(values),
            }
            cells.append(f"{statistics.mean(values):{spec}} ({sd:{spec}}) [{min(values):{spec}}, {max(values):{spec}}]")
        lines.append(f"| {row} | {cells[0]} | {cells[1]} |")
    print("\n".join(lines))
    if JSON.value:
        report = {"seeds": seeds, "set": SET.value, "config": CONFIG.value, "spread": spread}
        report["per_seed"] = {
            s: {
                "rows": {k: {m: v[m] for m, _, _ in METRICS} for k, v in r["rows"].items()},
                "paired": r["paired"],
                "targets": targets(r),
                "minutes": r["minutes"],
            }
            for s, r in results.items()
        }
        with open(JSON.value, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    app.run(main)
