"""The tables of the studies that ran on more than one machine, seed by seed, from the converge
folders below: the schedules study (uniform, ats-paper and lsm under linear, cosine and quad) and
the study of whether the gain is adaptive (the fixed tables and the freeze, under linear and
cosine).

`experiments.report` refuses to merge these folders, and rightly: they were made on machines
whose floats differ, so each trained its own KID/FD feature net (hashes in the output) and their
KID and FD are not on one scale. The NLL needs no feature net, nor do the pixel scores of
`experiments.score` (kept in each folder's scores.json), so this script tabulates those across the
folders, and compares training seconds only between runs of one machine (same feature net) and
one code. Run from the repository root:

    python -m experiments.table > experiments/results/schedules/table.txt
    python -m experiments.table adaptive > experiments/results/adaptive/table.txt
"""
import json
import os
import statistics
import sys

from experiments.common import mean_std

R = "experiments/results"
STUDIES = {
    "schedules": ({"linear": [f"{R}/study"],
                   "cosine": [f"{R}/schedules/cosine", f"{R}/schedules/cosine-b"],
                   "quad": [f"{R}/schedules/quad", f"{R}/schedules/quad-b"]},
                  ("uniform", "ats-paper", "lsm")),
    "adaptive": ({s: [f"{R}/adaptive/{s}{m}" for m in ("", "-b", "-c")]
                  for s in ("linear", "cosine")},
                 ("uniform", "ats-paper", "ats-frozen", "fixed-u", "ats-freeze")),
}


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
    machine (same feature net) from the same code."""
    out = (f", {run['curve'][-1]['nll'] - paired['curve'][-1]['nll']:+.3f} against uniform's "
           f"seed {run['seed']}" if paired else "")
    if target is None:
        return out
    grid, interpolated = crossing(run["curve"], target)
    if not grid:
        return out + "; does not reach uniform's final mean"
    out += f"; reaches uniform's final mean at step {grid} (interpolated {interpolated:.0f})"
    if paired and (paired["net"], paired["code"]) == (run["net"], run["code"]):
        seconds = next(p["cpu_seconds"] for p in run["curve"] if p["step"] == grid)
        out += (f", after {seconds / paired['curve'][-1]['cpu_seconds']:.2f} of uniform's seed "
                f"{run['seed']} training seconds (same machine)")
    return out


def pixel_scores(run, scores):
    """The run's last-step pixel scores in its folder's scores.json: {samples: [score per draw]}."""
    head = f"{run['variant']}/{run['seed']}/{run['curve'][-1]['step']}/"
    out = {}
    for key, value in scores.items():
        if key.startswith(head):
            out.setdefault(int(key.rsplit("/", 1)[1]), []).append(value)
    return out


def pixel_text(pix):
    """'pixel FD x (5,000 samples); distance m ± s (n draws of 299)', where scored."""
    parts = []
    if 5000 in pix:
        parts.append(f"pixel FD {pix[5000][0]['fd']:.3f} (5,000 samples)")
    if 299 in pix:
        mean, std = mean_std([v["nn"] for v in pix[299]])
        parts.append(f"distance {mean:.3f} ± {std:.3f} ({len(pix[299])} draws of 299)")
    return "; " + "; ".join(parts) if parts else "; not scored"


def summary(runs, variants, target):
    """Markdown, one row per variant: each seed's final NLL; mean ± std over seeds of it, of it
    minus uniform's same seed, of the pixel FD (first 5,000-sample draw) and of the distance
    (mean of the 299-sample draws); and the step at which each seed reaches uniform's final mean."""
    def cell(values):
        if len(values) < 2:
            return f"{values[0]:.3f} (1)" if values else "-"
        return "{:.3f} ± {:.3f} ({})".format(*mean_std(values), len(values))
    lines = ["| variant | final NLL, by seed | mean (seeds) | minus uniform, paired | reaches "
             "uniform's final mean, by seed | pixel FD, 5,000 | distance, 299 |",
             "|---|---|---|---|---|---|---|"]
    for variant in variants:
        mine = [runs[k] for k in sorted(runs) if k[0] == variant]
        paired = [r["curve"][-1]["nll"] - runs["uniform", r["seed"]]["curve"][-1]["nll"]
                  for r in mine if ("uniform", r["seed"]) in runs]
        reach = [crossing(r["curve"], target)[0] for r in mine]
        fds = [r["pix"][5000][0]["fd"] for r in mine if 5000 in r["pix"]]
        nns = [statistics.fmean(v["nn"] for v in r["pix"][299]) for r in mine if 299 in r["pix"]]
        finals = [r["curve"][-1]["nll"] for r in mine]
        lines.append(f"| {variant} | {' / '.join(f'{v:.3f}' for v in finals)} | {cell(finals)} | "
                     f"{cell(paired) if variant != 'uniform' else '-'} | "
                     f"{' / '.join(f'{step // 1000}k' if step else '-' for step in reach)} | "
                     f"{cell(fds)} | {cell(nns)} |")
    return "\n".join(lines)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "schedules"
    if name not in STUDIES:
        raise SystemExit(f"error: unknown study {name!r}: choose from {', '.join(STUDIES)}")
    folders_of, variants = STUDIES[name]
    for schedule, folders in folders_of.items():
        runs, made = {}, []
        for folder in folders:
            if not os.path.exists(os.path.join(folder, "results.json")):
                print(f"({folder}: not there yet)")
                continue
            with open(os.path.join(folder, "results.json")) as f:
                results = json.load(f)
            scores = {}
            if os.path.exists(os.path.join(folder, "scores.json")):
                with open(os.path.join(folder, "scores.json")) as f:
                    scores = json.load(f)
            made.append(f"  {folder}: code {results['provenance']['code']}, KID/FD feature net "
                        f"{results['eval']['feature_net']}")
            for run in results["runs"]:
                if run["variant"] in variants:
                    runs[run["variant"], run["seed"]] = {
                        **run, "net": results["eval"]["feature_net"],
                        "code": results["provenance"]["code"],
                        "pix": pixel_scores(run, scores)}
        uniform = [runs[k]["curve"][-1]["nll"] for k in sorted(runs) if k[0] == "uniform"]
        target = statistics.mean(uniform) if uniform else None
        scored = any(r["pix"] for r in runs.values())
        print(f"\n## {schedule}: uniform's final mean over {len(uniform)} seeds "
              + (f"{target:.4f}" if uniform else "(no uniform run)"))
        print("\n".join(made))
        for variant in variants:
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
                if scored:
                    line += pixel_text(run["pix"])
                print(line)
        if uniform and scored:
            print("\n" + summary(runs, variants, target))


if __name__ == "__main__":
    main()
