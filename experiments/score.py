"""A sample metric for the converge studies that is scored afterwards, from the EMA weights each
study keeps at every evaluation (<out>/weights), with its own noise measured beside it.

    python -m experiments.score runs/study                  # every run at its last step
    python -m experiments.score runs/study --steps all --draws 3 --only uniform:0   # resolution

The metric: the Frechet distance (and KID, unbiased, cubic kernel) between --samples DDIM samples
and all 1,498 training digits, in pixel space. For 8x8 digits the 64 pixels are the whole image,
so no feature network decides what counts. Its noise is shown two ways: the spread over
independent sample draws of one checkpoint (--draws), and the spread between real sets, two
disjoint halves of the training digits (749 each, the largest the data allows; 10 splits).
Its floor: the 299 held-out digits scored against the training digits give the FD of new real
digits at that size, to compare with generated sets of the same size (--samples 299). Beside the
FD, each score records the median pixel distance from a sample to its nearest training digit
(`nn`): copies of training digits score below the held-out digits' own, samples off the data
above it.
Scores go to <study>/scores.json, one entry per (variant, seed, step, draw), kept across calls.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

import ats
import train
from experiments.common import mean_std, seeded
from experiments.converge import load_digits_split

DDIM_STEPS = 50


def pixels(x):
    return x.flatten(1).double()


def kid_fd(a, b):
    """FD and KID (10 subsets of up to 1,000) of two pixel sets of any sizes, by torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
    kid = kid_features_to_metric(a, b, kid_subsets=10, kid_subset_size=min(len(a), len(b), 1000),
                                 verbose=False)[KEY_METRIC_KID_MEAN]
    fd = fid_statistics_to_metric(*map(fid_features_to_statistics, (a, b)), False)
    return {"fd": next(iter(fd.values())), "kid": kid}


def nearest(x, real):
    """The median over x of the pixel-space L2 distance to the nearest real image."""
    return float(torch.cdist(pixels(x), pixels(real)).min(1).values.median())


def real_vs_real(real, splits=10):
    """FD and KID between two disjoint halves of the real images, over random splits."""
    half, values = len(real) // 2, []
    for i in range(splits):
        perm = torch.randperm(len(real), generator=seeded(i))
        values.append(kid_fd(pixels(real[perm[:half]]), pixels(real[perm[half:2 * half]])))
    return {"n": half, "splits": splits,
            **{k: list(mean_std([v[k] for v in values])) for k in ("fd", "kid")}}


def ema_model(run, path):
    """The run's U-Net with the EMA weights at `path`, and its diffusion."""
    names = {f.name for f in dataclasses.fields(train.Config)}
    cfg = train.Config(**{k: v for k, v in run["config"].items() if k in names})
    trainer = train.build(cfg, torch.device("cpu"))
    trainer.ema.load_state_dict(torch.load(path, weights_only=True))
    return trainer.ema.eval(), trainer.diffusion


@torch.no_grad()
def score(model, diffusion, real, n, draw):
    """FD and KID of n DDIM samples (noise seeded by `draw`) against the real images."""
    shape = (n, *real.shape[1:])
    samples = ats.ddim_sample(diffusion, model, shape, steps=min(DDIM_STEPS, diffusion.T),
                              generator=seeded(1000 + draw))
    return {**kid_fd(pixels(samples), pixels(real)), "nn": nearest(samples, real)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a converge output folder (results.json and weights/)")
    p.add_argument("--samples", type=int, default=5000, help="DDIM samples per score")
    p.add_argument("--draws", type=int, default=1, help="independent sample draws per checkpoint")
    p.add_argument("--steps", default="last", choices=("last", "all"),
                   help="score each run's last evaluation, or every one")
    p.add_argument("--only", default="", help="variant:seed,... to score (default: every run)")
    args = p.parse_args(argv)
    with open(os.path.join(args.study, "results.json")) as f:
        results = json.load(f)
    path = os.path.join(args.study, "scores.json")
    scores = json.load(open(path)) if os.path.exists(path) else {}
    (real, _), (held, _) = load_digits_split()
    if "real_vs_real" not in scores:                  # setdefault would redo the 10 splits
        scores["real_vs_real"] = real_vs_real(real)
    noise = scores["real_vs_real"]
    floor = scores["heldout_vs_train"] = {"n": len(held), **kid_fd(pixels(held), pixels(real)),
                                          "nn": nearest(held, real)}
    only = {tuple(s.split(":")) for s in args.only.split(",") if s}
    for run in results["runs"]:
        if only and (run["variant"], str(run["seed"])) not in only:
            continue
        steps = [c["step"] for c in run["curve"]]
        for step in (steps if args.steps == "all" else steps[-1:]):
            weights = os.path.join(args.study, "weights",
                                   f"{run['variant']}_seed{run['seed']}_step{step}.pt")
            if not os.path.exists(weights):
                print(f"  {run['variant']} seed {run['seed']} step {step}: no weights, skipped")
                continue
            model, diffusion = ema_model(run, weights)
            for draw in range(args.draws):
                key = f"{run['variant']}/{run['seed']}/{step}/{draw}/{args.samples}"
                if key not in scores:
                    tic = time.time()
                    scores[key] = score(model, diffusion, real, args.samples, draw)
                    with open(path + ".tmp", "w") as f:
                        json.dump(scores, f, indent=1)
                    os.replace(path + ".tmp", path)
                    print(f"  {key}: FD {scores[key]['fd']:.4f}  KID x1e3 "
                          f"{1e3 * scores[key]['kid']:.3f}  ({time.time() - tic:.0f} s)",
                          flush=True)
    print(f"real vs real ({noise['n']} vs {noise['n']}, {noise['splits']} splits): FD "
          f"{noise['fd'][0]:.4f} ± {noise['fd'][1]:.4f}, KID x1e3 {1e3 * noise['kid'][0]:.3f} ± "
          f"{1e3 * noise['kid'][1]:.3f}; held-out vs training ({floor['n']} vs {len(real)}): FD "
          f"{floor['fd']:.4f}, nearest training digit {floor['nn']:.3f}")
    print(table(results, scores, args.samples))
    return scores


def table(results, scores, n):
    """Markdown: per variant, the last step's NLL and pixel FD, mean ± std over seeds and, for
    FD, over draws too."""
    lines = ["| variant | seeds | NLL bpd | pixel FD | KID x1e3 | nearest training digit |",
             "|---|---|---|---|---|---|"]
    for variant in results["variants"]:
        runs = [r for r in results["runs"] if r["variant"] == variant]
        fds, kids, nns, seeds = [], [], [], []
        for r in runs:
            last = r["curve"][-1]["step"]
            got = [v for k, v in scores.items()
                   if k.startswith(f"{variant}/{r['seed']}/{last}/") and k.endswith(f"/{n}")]
            if got:
                seeds.append(r["seed"])
                fds.append(statistics.fmean(v["fd"] for v in got))
                kids.append(statistics.fmean(v["kid"] for v in got))
                nns += [statistics.fmean(v["nn"] for v in got)] if "nn" in got[0] else []
        if not runs:
            continue
        nll = mean_std([r["curve"][-1]["nll"] for r in runs])
        fd = "-" if not fds else "{:.4f} ± {:.4f}".format(*mean_std(fds))
        kid = "-" if not kids else "{:.3f} ± {:.3f}".format(*[1e3 * v for v in mean_std(kids)])
        nn = "-" if not nns or len(nns) < len(fds) else "{:.3f} ± {:.3f}".format(*mean_std(nns))
        lines.append(f"| {variant} | {len(runs)} ({len(seeds)} scored) | {nll[0]:.3f} ± "
                     f"{nll[1]:.3f} | {fd} | {kid} | {nn} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
