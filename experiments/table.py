"""The schedules table: the held-out NLL of uniform, ats-paper and lsm under the linear, cosine and
quad schedules, seed by seed, from the converge folders below.

`experiments.report` refuses to merge these folders, and rightly: they were made on two machines
whose floats differ, so each trained its own KID/FD feature net (hashes in the output) and their
KID and FD are not on one scale. The NLL needs no feature net, so this script tabulates the NLL
alone, and compares training seconds only between runs of one machine (same feature net). Run
from the repository root:

    python -m experiments.table > experiments/results/schedules/table.txt
"""
import json
import os
import statistics

from experiments.common import mean_std

R = "experiments/results"
FOLDERS = {"linear": [f"{R}/study"],
           "cosine": [f"{R}/schedules/cosine", f"{R}/schedules/cosine-b"],
           "quad": [f"{R}/schedules/quad", f"{R}/schedules/quad-b"]}
VARIANTS = ("uniform", "ats-paper", "lsm")


def crossing(curve, target):
    """The first evaluation step at or below `target`, and the step found by interpolating the
    curve linearly from the evaluation before it; (None, None) if the run never gets there."""
    for before, point in zip([None] + curve, curve):
        if point["nll"] <= target:
            if before is None:
                return point["step"], point["step"]
            f = (before["nll"] - target) / (before["nll"] - point["nll"])
            return point["step"], before["step"] + f * (point["step"] - before["step"])
    return None, None


def against_uniform(run, paired, target):
    """A run's final NLL minus uniform's same seed, where it reaches uniform's final mean
    `target`, and its training seconds there over that uniform run's when both ran on one
    machine."""
    out = (f", {run['curve'][-1]['nll'] - paired['curve'][-1]['nll']:+.3f} against uniform's "
           f"seed {run['seed']}" if paired else "")
    if target is None:
        return out
    grid, interpolated = crossing(run["curve"], target)
    if not grid:
        return out + "; does not reach uniform's final mean"
    out += f"; reaches uniform's final mean at step {grid} (interpolated {interpolated:.0f})"
    if paired and paired["net"] == run["net"]:
        seconds = next(p["cpu_seconds"] for p in run["curve"] if p["step"] == grid)
        out += (f", after {seconds / paired['curve'][-1]['cpu_seconds']:.2f} of uniform's seed "
                f"{run['seed']} training seconds (same machine)")
    return out


def main():
    for schedule, folders in FOLDERS.items():
        runs, made = {}, []
        for folder in folders:
            if not os.path.exists(os.path.join(folder, "results.json")):
                print(f"({folder}: not there yet)")
                continue
            with open(os.path.join(folder, "results.json")) as f:
                results = json.load(f)
            made.append(f"  {folder}: code {results['provenance']['code']}, KID/FD feature net "
                        f"{results['eval']['feature_net']}")
            for run in results["runs"]:
                if run["variant"] in VARIANTS:
                    runs[run["variant"], run["seed"]] = {**run,
                                                         "net": results["eval"]["feature_net"]}
        uniform = [runs[k]["curve"][-1]["nll"] for k in sorted(runs) if k[0] == "uniform"]
        target = statistics.mean(uniform) if uniform else None
        print(f"\n## {schedule}: uniform's final mean over {len(uniform)} seeds "
              + (f"{target:.4f}" if uniform else "(no uniform run)"))
        print("\n".join(made))
        for variant in VARIANTS:
            seeds = sorted(s for v, s in runs if v == variant)
            if not seeds:
                print(f"{variant}: no runs")
                continue
            finals = [runs[variant, s]["curve"][-1]["nll"] for s in seeds]
            mean, std = mean_std(finals)
            print(f"{variant}: final NLL {mean:.3f} ± {std:.3f} over seeds "
                  f"{', '.join(map(str, seeds))}")
            for seed in seeds:
                run = runs[variant, seed]
                line = f"  seed {seed}: " + " ".join(f"{p['nll']:.3f}" for p in run["curve"])
                if variant != "uniform":
                    line += against_uniform(run, runs.get(("uniform", seed)), target)
                if run.get("quarters"):
                    line += "; quarters " + " ".join(f"{q:.2f}" for q in run["quarters"])
                print(line)


if __name__ == "__main__":
    main()
