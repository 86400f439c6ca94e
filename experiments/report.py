"""One report from converge studies: the summary table, every evaluation point, how each ATS
policy moved, the curves and policies; and the merge of folders made apart.

    python -m experiments.report runs/a runs/b --out runs/ab
"""

import argparse
import json
import os
import shutil
import statistics

from experiments.common import mean_std, pyplot


def read_results(folder):
    path = os.path.join(folder, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): it is missing or was "
                         "not written by experiments.converge") from None
    problem = results_problem(results)
    if problem:
        raise SystemExit(f"error: cannot use {path}: {problem}; it was not written by this version "
                         "of experiments.converge, or was edited")
    return results


# What the report reads from a results.json: its keys, the keys of three of its parts, each run's
STUDY = ("steps", "evals", "config", "eval", "noise", "clock", "provenance", "variants", "runs")
PARTS = {"eval": ("train_images", "held_out_images", "nll_images", "samples", "ddim_steps",
                  "feature_net_accuracy"), "noise": ("n", "draws", "kid", "fd"),
         "provenance": ("code", "commit", "torch", "device")}
RUN = ("variant", "seed", "config", "curve", "quarters", "final_p")


def results_problem(results):
    """What keeps `results` from being a converge study the report can read, in words; or None."""
    if not isinstance(results, dict) or any(k not in results for k in STUDY):
        return f"it is not an object with {', '.join(STUDY)}"
    for key, inner in PARTS.items():
        if not isinstance(results[key], dict) or any(k not in results[key] for k in inner):
            return f"its {key!r} lacks one of {', '.join(inner)}"
    if not all(isinstance(results[k], list) for k in ("evals", "variants", "runs")):
        return "its evals, variants and runs are not lists"
    point = ("step", results["clock"], *METRICS)
    for i, run in enumerate(results["runs"], start=1):
        if not (isinstance(run, dict) and all(k in run for k in RUN)
                and isinstance(run["variant"], str) and type(run["seed"]) is int):
            return f"run {i} lacks one of {', '.join(RUN)}"
        curve, name = run["curve"], f"run {i} ({run['variant']} seed {run['seed']})"
        if not isinstance(curve, list) or len(curve) != len(results["evals"]):
            return f"{name} does not have its {len(results['evals'])} evaluations"
        if not all(isinstance(p, dict) and all(type(p.get(k)) in (int, float) for k in point)
                   for p in curve):
            return f"{name} has an evaluation without {', '.join(point)}"
        if not all(v is None or isinstance(v, list) for v in (run["quarters"], run["final_p"])):
            return f"{name} has quarters or final_p that are not lists"
    return None


def same_study(a, b, what):
    """Refuse to combine results that measured different things, or were made by other code."""
    for key, label in (("steps", "steps"), ("evals", "evaluation steps"), ("config", "base config"),
                       ("eval", "evaluation settings"), ("clock", "clock")):
        if a.get(key) != b.get(key):
            raise SystemExit(f"error: {what} differ in their {label}; combine only like with like")
    for key, label in (("code", "code version"), ("device", "device or thread count")):
        if a["provenance"].get(key) != b["provenance"].get(key):
            values = f"{a['provenance'].get(key)} vs {b['provenance'].get(key)}"
            raise SystemExit(f"error: {what} differ in their {label} ({values}); combine only runs "
                             "of one code on one kind of machine")


# -------------------------------------------------------------------------------------------------
# converge: the summary, its tables and its plots
# -------------------------------------------------------------------------------------------------

METRICS = ("nll", "kid", "fd")


def summarise(results):
    """Mean and std across seeds at every evaluation step, and where each variant first reaches
    uniform's final mean: its step, training seconds and their ratio to uniform's; on NLL also
    where each of its seeds does."""
    clock, summary = results["clock"], {}
    for name in results["variants"]:
        runs = [r for r in results["runs"] if r["variant"] == name]
        if not runs:
            continue
        points = []
        for i, step in enumerate(results["evals"]):
            row = {"step": step}
            for key, source in (("seconds", clock), *((m, m) for m in METRICS)):
                row[key], row[key + "_std"] = mean_std([r["curve"][i][source] for r in runs])
            points.append(row)
        summary[name] = {"points": points, "seeds": [r["seed"] for r in runs],
                         "quarters": [r["quarters"] for r in runs],
                         "final_p": [r["final_p"] for r in runs]}
    if "uniform" in summary:
        final = summary["uniform"]["points"][-1]

        def reach(points, key, seconds):
            """The first point at or below uniform's final mean, or None."""
            p = next((p for p in points if p[key] <= final[key]), None)
            return p and {"step": p["step"], "seconds": p[seconds],
                          "ratio": p[seconds] / final["seconds"]}
        for name, s in summary.items():
            s["reach"] = {key: reach(s["points"], key, "seconds") for key in METRICS}
            s["reach_seeds"] = [{"seed": r["seed"], "nll": reach(r["curve"], "nll", clock)}
                                for r in sorted((r for r in results["runs"]
                                                 if r["variant"] == name), key=lambda r: r["seed"])]
    return summary


def header(results):
    """What was measured, how, and the metric's own noise: printed first, and atop results.md."""
    e, n, p = results["eval"], results["noise"], results["provenance"]
    clock = "CPU seconds of the process" if results["clock"] == "cpu_seconds" else "wall-clock"
    return "\n".join([
        f"Digits 8x8: the diffusion model trains on {e['train_images']} images for "
        f"{results['steps']} steps; evaluations at steps {', '.join(map(str, results['evals']))}.",
        f"NLL: the bound in bits/dim on {e['nll_images']} held-out images, fixed noise. Sample "
        f"metric: KID (unbiased, cubic kernel; the headline) and FD of {e['samples']} DDIM-"
        f"{e['ddim_steps']} samples against {e['samples']} fixed training images, in the "
        f"standardised features of a classifier trained on the {e['held_out_images']} held-out "
        f"images only ({100 * e['feature_net_accuracy']:.1f}% accurate on the training images, "
        "which it never sees).",
        f"Real vs real, the metric's own noise (two disjoint sets of {n['n']} training images, "
        f"{n['draws']} draws, mean ± std): KID x1e3 {fmt_kid(*n['kid'])}, FD {n['fd'][0]:.2f} ± "
        f"{n['fd'][1]:.2f}. Read every difference below against it.",
        f"train s: {clock} spent in training steps (evaluation excluded). Code {p['code']} "
        f"(commit {(p['commit'] or 'unknown')[:10]}), torch {p['torch']}, {p['device']}."])


def fmt_kid(mean, std):
    """KID, in units of 1e-3 (the tables say KID x1e3)."""
    return f"{1e3 * mean:.2f} ± {1e3 * std:.2f}"


def write_report(results, out, quiet=False):
    """results.json (written atomically), results.md, curves.png and policies.png."""
    summary = summarise(results)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    pm = lambda m, s, f: f"{m:{f}} ± {s:{f}}"
    reach = lambda r: "not reached" if r is None else f"{r['step']} ({r['ratio']:.2f})"
    lines = [header(results), "",
             "Final values: mean ± std over seeds. 'Reaches uniform's final': the first evaluation "
             "step at which the variant's mean is at or below uniform's final mean, and (in "
             "brackets) its training seconds there over uniform's total.", "",
             "| variant | seeds | NLL bpd | KID x1e3 | FD | train s | reaches uniform's final NLL "
             "| ... KID | ... FD | final quarter masses |", "|---" * 10 + "|"]
    for name, s in summary.items():
        p, r = s["points"][-1], s.get("reach", {})
        quarters = " / ".join(" ".join(f"{m:.2f}" for m in q) for q in s["quarters"] if q) or "-"
        lines.append(f"| {name} | {','.join(map(str, s['seeds']))} | "
                     f"{pm(p['nll'], p['nll_std'], '.3f')} | {fmt_kid(p['kid'], p['kid_std'])} | "
                     f"{pm(p['fd'], p['fd_std'], '.2f')} | "
                     f"{pm(p['seconds'], p['seconds_std'], '.0f')} | {reach(r.get('nll'))} | "
                     f"{reach(r.get('kid'))} | {reach(r.get('fd'))} | {quarters} |")
    seeds = [f"{name}: " + ", ".join(f"seed {r['seed']} {reach(r['nll'])}"
                                     for r in s["reach_seeds"])
             for name, s in summary.items() if name != "uniform" and s.get("reach_seeds")]
    if seeds:
        lines += ["", "Each seed on its own: the first evaluation step at which that seed's NLL is "
                  "at or below uniform's final mean, and (in brackets) that seed's training "
                  "seconds there over uniform's mean total.", "", *(f"- {x}" for x in seeds)]
    lines += ["", "Every evaluation step:", "",
              "| variant | step | train s | NLL bpd | KID x1e3 | FD |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for p in s["points"]:
            lines.append(f"| {name} | {p['step']} | {p['seconds']:.0f} | "
                         f"{pm(p['nll'], p['nll_std'], '.3f')} | {fmt_kid(p['kid'], p['kid_std'])}"
                         f" | {pm(p['fd'], p['fd_std'], '.2f')} |")
    lines += swings(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines[1:]))
    plot(summary, results, out, quiet)
    plot_updates(results, out)
    return {**results, "summary": summary}


def swings(results):
    """results.md's table of how each ATS run's policy moved: its largest per-update KLs and when,
    the longest stretch with 90% of its mass in one quarter of t, how often t = T-1 was in S, and
    the rewards' typical scale."""
    runs = [r for r in results["runs"] if r.get("updates")]
    if not runs:
        return []
    lines = ["", "How the policy moved, per sampler update: the batch-mean KL(pi after || pi "
             "before) of its three largest updates (at step), the longest stretch of updates "
             "with >= 90% of the mass in one quarter of t, the share of updates with t = T-1 in "
             "S, and the median RMS of the rewards (bits/dim).", "",
             "| variant | seed | largest update KLs | longest >= 90% in one quarter | T-1 in S | "
             "median reward RMS |", "|---|---|---|---|---|---|"]
    for run in runs:
        ups, T = run["updates"], run["config"]["T"]
        top = sorted(ups, key=lambda u: -u["kl_step"])[:3]
        stretch, longest = [], []
        for u in ups:
            stretch = stretch + [u] if max(u["quarters"]) >= 0.9 else []
            longest = max(longest, stretch, key=len)
        held = (f"{len(longest)} updates, steps {longest[0]['step']}-{longest[-1]['step']}"
                if longest else "none")
        last = sum(T - 1 in u["S"] for u in ups) / len(ups)
        rms = statistics.median(u["reward_rms"] for u in ups)
        lines.append(f"| {run['variant']} | {run['seed']} | "
                     + ", ".join(f"{u['kl_step']:.2f} ({u['step']})" for u in top)
                     + f" | {held} | {100 * last:.0f}% | {rms:.2g} |")
    return lines


def plot_updates(results, out):
    """updates.png: each ATS run's per-update KL (how far one update moved the policy) and its KL
    from uniform, against the training step."""
    runs = [r for r in results["runs"] if r.get("updates")]
    plt = pyplot() if runs else None
    if plt is None:
        return
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 2.6 * len(variants)), squeeze=False)
    for row, name in zip(axes, variants):
        for run in (r for r in runs if r["variant"] == name):
            steps = [u["step"] for u in run["updates"]]
            for ax, key in zip(row, ("kl_step", "kl_uniform")):
                ax.plot(steps, [max(u[key], 1e-6) for u in run["updates"]], lw=0.8,
                        label=f"seed {run['seed']}")
        for ax, what in zip(row, ("KL of one update", "KL from uniform")):
            ax.set(yscale="log", xlabel="training step", ylabel=f"{what} (nats)",
                   title=f"{name}: {what}")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "updates.png"), dpi=100)
    plt.close(fig)


def plot(summary, results, out, quiet):
    """curves.png: NLL, KID and FD (mean ± std over seeds) against steps and training seconds,
    with the real-vs-real band; policies.png: each ATS run's final T pi(t)."""
    plt = pyplot()
    if plt is None:
        if not quiet:
            print("curves.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    labels = {"nll": "held-out NLL bound (bits/dim)", "kid": "KID (classifier features)",
              "fd": "FD (classifier features)"}
    fig, axes = plt.subplots(3, 2, figsize=(11, 10))
    for row, key in zip(axes, METRICS):
        for ax, axis in zip(row, ("step", "seconds")):
            for name, s in summary.items():
                ax.errorbar([p[axis] for p in s["points"]], [p[key] for p in s["points"]],
                            yerr=[p[key + "_std"] for p in s["points"]], marker="o", ms=3,
                            capsize=2, label=name)
            if key in results["noise"]:
                mean, std = results["noise"][key]
                ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, label="real vs real")
            ax.set_xlabel("training steps" if axis == "step" else "training seconds")
            ax.set_ylabel(labels[key])
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(handles=axes[1][0].patches[:1], fontsize=8)   # the real-vs-real band
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    policies = {n: s for n, s in summary.items() if any(s["final_p"])}
    if not policies:
        return
    fig, axes = plt.subplots(1, len(policies), figsize=(5 * len(policies), 3.5), squeeze=False,
                             sharey=True)
    for ax, (name, s) in zip(axes[0], policies.items()):
        for seed, p in zip(s["seeds"], s["final_p"]):
            ax.plot([v * len(p) for v in p], label=f"seed {seed}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{name}: final policy")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("T pi(t), batch mean (1 = uniform)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "policies.png"), dpi=100)
    plt.close(fig)


def merge(args):
    """One report, with the policy heatmaps, from several converge folders (for example a seed or
    a few variants each, run side by side). Refuses folders that measured differently, ran other
    code, or repeat a run."""
    parts = [read_results(folder) for folder in args.folders]
    for folder, part in zip(args.folders[1:], parts[1:]):
        same_study(parts[0], part, f"{args.folders[0]} and {folder}")
    runs, seen = [], {}
    for folder, part in zip(args.folders, parts):
        for run in part["runs"]:
            key = (run["variant"], run["seed"])
            if key in seen:
                raise SystemExit(f"error: {run['variant']} seed {run['seed']} is in both "
                                 f"{seen[key]} and {folder}: a run may be counted once")
            seen[key] = folder
            runs.append(run)
    for run in runs:
        first = next(r for r in runs if r["variant"] == run["variant"])
        if {**first["config"], "seed": 0} != {**run["config"], "seed": 0}:
            raise SystemExit(f"error: variant {run['variant']} was run with different settings in "
                             "different folders: give them different names")
    inputs = {os.path.realpath(f) for f in args.folders}
    if os.path.realpath(args.out) in inputs:
        raise SystemExit("error: --out is one of the folders being merged: choose a new folder")
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and not os.listdir(args.out)):
        raise SystemExit(f"error: --out {args.out} exists and is not an empty folder (a report "
                         "there would be overwritten): choose a new or empty folder")
    os.makedirs(args.out, exist_ok=True)
    for folder in args.folders:                          # the policy heatmaps come along
        for name in sorted(os.listdir(folder)):
            if name.startswith("policy_") and name.endswith(".png"):
                shutil.copy2(os.path.join(folder, name), args.out)
    # The report is of the runs there are; the study is complete when every variant (one that was
    # run, or one that a folder planned) has a run for every seed that any run has
    planned, ran = [v for p in parts for v in p["variants"]], [r["variant"] for r in runs]
    seeds = sorted({r["seed"] for r in runs})
    missing = [f"{v} seed {s}" for v in dict.fromkeys(planned + ran) for s in seeds
               if (v, s) not in seen]
    if missing:
        print(f"incomplete: no run of {', '.join(missing)}")
    merged = {**parts[0], "variants": list(dict.fromkeys(v for v in planned + ran if v in ran)),
              "runs": runs, "complete": not missing,
              "merged_from": [os.path.abspath(f) for f in args.folders]}
    return write_report(merged, args.out)


# -------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="converge output folders")
    p.add_argument("--out", required=True, help="a new folder for the merged report")
    return merge(p.parse_args(argv))


if __name__ == "__main__":
    main()
