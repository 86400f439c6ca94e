"""What ATS buys against uniform sampling, a placebo, the baselines and fixed tables, on
scikit-learn's 8x8 digits, measured on the machine at hand.

    python -m experiments.converge --quick         # the whole study in miniature, a few minutes
    python -m experiments.converge                 # uniform, ATS, its placebo and log-normal
    python -m experiments.converge --long          # the head-to-head: 500 sampler updates, 3 seeds
    python -m experiments.converge --long --resume --out runs/bench   # continue a study

Needs scikit-learn (the digits) and torch-fidelity (KID and FD); matplotlib draws the curves.
Trainers are built by train.build and driven by Trainer.run, so the study trains exactly what
train.py trains. Training time counts training steps only, never evaluation. Every evaluation's
EMA weights are kept in <out>/weights for sample metrics scored afterwards (experiments.score).
"""

import argparse
import dataclasses
import hashlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ats
import baselines
import train
from experiments.common import (
    build,
    claimed,
    make_config,
    mean_std,
    parse_overrides,
    provenance,
    seeded,
)
from experiments.report import header, read_results, same_study, write_report
from experiments.variants import (
    ALL_VARIANTS,
    DEFAULT_VARIANTS,
    STUDY_VARIANTS,
    VARIANTS,
    parse_variants,
)

# -------------------------------------------------------------------------------------------------
# converge: the data, and a sample metric whose own noise is measured
# -------------------------------------------------------------------------------------------------

# The converge model: a small U-Net on 8x8x1 digits, T=1000 linear, an EMA decay for short runs.
DIGITS = {"image_size": 8, "channels": 1, "ch": 32, "ch_mult": "1,2", "num_res": 1, "attn_res": "4",
          "dropout": 0.1, "T": 1000, "schedule": "linear", "batch_size": 64, "lr": 1e-3,
          "warmup": 100, "ema_decay": 0.995, "amp": "none", "compile": False}


def need(module, package, purpose):
    """Stop with one line if an optional package is missing."""
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"error: converge needs {package} for {purpose}: pip install {package}")


def load_digits_split(test_fraction=1 / 6):
    """sklearn's 8x8 digits in [-1, 1] as (N, 1, 8, 8) with labels, split once (seed 0): the
    diffusion model trains on the first part (1,498 images); the held-out part (299) gives the
    NLL images and trains the feature network."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / digits.images.max() * 2 - 1
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = int(len(x) * test_fraction)
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


class DigitClassifier(nn.Module):
    """Two conv layers and an MLP; `features` is the penultimate layer the sample metric uses."""

    def __init__(self, in_ch, n_classes, width=64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, width), nn.ReLU())
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def feature_net(held_out, unseen, path, epochs=60, seed=0):
    """The classifier whose features the sample metric uses: trained (seeded) on the held-out split
    only, and cached at `path`. Returns it, its accuracy on `unseen` (the diffusion model's
    training images, which it never sees) and a hash of its weights."""
    x, y = held_out
    torch.manual_seed(seed)
    net = DigitClassifier(x.shape[1], int(y.max()) + 1)
    if os.path.isfile(path):
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
        torch.save(net.state_dict(), path)
    net.eval()
    digest = hashlib.sha256()
    with torch.no_grad():
        acc = (net(unseen[0]).argmax(1) == unseen[1]).float().mean().item()
        for value in net.state_dict().values():
            digest.update(value.numpy().tobytes())
    return net, acc, digest.hexdigest()[:16]


def kid_fd(a, b):
    """KID (unbiased, cubic polynomial kernel, one estimate over the whole sets) and the Fréchet
    distance between two feature sets of equal size, both computed by torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
    a, b = a.double().cpu(), b.double().cpu()
    kid = kid_features_to_metric(a, b, kid_subsets=1, kid_subset_size=len(a), verbose=False)
    stats = [fid_features_to_statistics(f) for f in (a, b)]
    fd = next(iter(fid_statistics_to_metric(*stats, False).values()))
    return {"kid": kid[KEY_METRIC_KID_MEAN], "fd": fd}


class SampleMetric:
    """KID (the headline) and FD of n images against n fixed real ones, in the feature network's
    penultimate features, standardised by the real images' mean and std per feature. `noise`
    measures the metric between real sets: the reference every difference is read against."""

    def __init__(self, net, real, n, seed=0):
        self.net, self.n = net, n
        with torch.no_grad():
            feats = net.features(real)                                     # (N, width)
        self.keep = feats.std(0) > 1e-6                                    # dead ReLUs say nothing
        self.mean, self.std = feats[:, self.keep].mean(0), feats[:, self.keep].std(0)
        self.real = self.standardise(feats)
        self.reference = self.real[torch.randperm(len(real), generator=seeded(seed))[:n]]

    def standardise(self, feats):
        return (feats[:, self.keep] - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images):
        return kid_fd(self.standardise(self.net.features(images)), self.reference)

    def noise(self, draws=10, seed=1):
        """Mean and std of KID and FD between two disjoint random sets of n real images."""
        gen, values = seeded(seed), []
        for _ in range(draws):
            perm = torch.randperm(len(self.real), generator=gen)
            values.append(kid_fd(self.real[perm[:self.n]], self.real[perm[self.n:2 * self.n]]))
        return {"draws": draws, "n": self.n,
                **{key: mean_std([v[key] for v in values]) for key in ("kid", "fd")}}


class Evaluator:
    """Held-out NLL bound (fixed images, fixed noise) and the sample metric of DDIM samples, both
    from the EMA weights."""

    def __init__(self, nll_x, metric, ddim_steps):
        self.nll_x, self.metric, self.ddim_steps = nll_x, metric, ddim_steps

    @torch.no_grad()
    def __call__(self, trainer):
        ema, diffusion, gen = trainer.ema, trainer.diffusion, seeded(0)  # the same draws each time
        nll = ats.nll_bpd(diffusion, ema, self.nll_x.to(trainer.device), batch_size=1000,
                          generator=gen)
        shape = (self.metric.n, *self.nll_x.shape[1:])
        samples = ats.ddim_sample(diffusion, ema, shape, steps=self.ddim_steps, generator=gen).cpu()
        return {"nll": nll.mean().item(), **self.metric(samples)}




# -------------------------------------------------------------------------------------------------
# One training run, evaluated at regular steps
# -------------------------------------------------------------------------------------------------


def batches(x, batch_size, gen):
    """Endless shuffled minibatches of x; the order depends only on `gen`."""
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield x[idx]


def eval_steps(steps, n_evals):
    return sorted({round(steps * (i + 1) / n_evals) for i in range(n_evals)})


def train_run(cfg, sampler_cls, train_x, evaluate, evals, device, name, table=None, weights=None):
    """One run, evaluated at the steps in `evals`, with a progress line at each evaluation. Data
    order, initial weights and training noise depend on cfg.seed only, not on the variant. Returns
    the run's record and, for ATS, the policy's history for the heatmap. Training time is counted
    both as the process's CPU seconds (robust to other processes sharing the machine) and as
    wall-clock seconds."""
    trainer = build(cfg, device, sampler_cls=sampler_cls)
    if table is not None:
        trainer.sampler = baselines.TableSampler(table)
    data = batches(train_x, cfg.batch_size, seeded(cfg.seed))
    log, curve, cpu, wall, updates = train.SamplerLog(cfg.heatmap_height), [], 0.0, 0.0, []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tic = time.process_time(), time.perf_counter()
    for _ in trainer.run(data, evals[-1]):
        sync()
        cpu, wall = cpu + time.process_time() - tic[0], wall + time.perf_counter() - tic[1]
        if trainer.sampler_stats:
            log.record(trainer.step - 1, trainer.sampler_stats, cfg.update_every)
            updates.append(update_record(trainer.step - 1, log.summary))
        if trainer.step in evals:
            curve.append({"step": trainer.step, "cpu_seconds": cpu, "wall_seconds": wall,
                          **evaluate(trainer)})
            if weights:  # the EMA weights, for sample metrics scored afterwards
                os.makedirs(weights, exist_ok=True)
                torch.save(trainer.ema.state_dict(),
                           os.path.join(weights, f"{name}_seed{cfg.seed}_step{trainer.step}.pt"))
            print(f"  {name:14s} seed {cfg.seed}: step {trainer.step}/{evals[-1]}  NLL "
                  f"{curve[-1]['nll']:.3f} bpd  train {cpu:.0f} CPU s, {wall:.0f} s wall",
                  flush=True)
        tic = time.process_time(), time.perf_counter()
    last_p = log.history[-1] if log.history else None
    final_p = None if last_p is None else [float(f"{v:.6g}") for v in last_p.tolist()]
    record = {"config": dataclasses.asdict(cfg), "curve": curve,
              "quarters": log.summary.get("quarters"), "final_p": final_p, "updates": updates}
    return record, log.history


def update_record(step, summary):
    """What one sampler update did, for the run's record: its step, how far it moved the policy,
    the policy's distance from uniform, the rewards' scale, S and where the mass is."""
    keep = ("kl_step", "kl_uniform", "reward", "reward_rms", "mean_t")
    return {"step": step, **{k: float(f"{summary[k]:.6g}") for k in keep},
            "S": summary["S"], "quarters": summary["quarters"]}


# -------------------------------------------------------------------------------------------------
# converge: the study, resumable, written after every run
# -------------------------------------------------------------------------------------------------


def check_converge_args(args, n_train, n_held_out):
    problems = [
        (min(args.seeds, args.steps, args.evals, args.ddim_steps) < 1,
         "--seeds, --steps, --evals and --ddim-steps must be at least 1"),
        (args.evals > args.steps, "--evals cannot exceed --steps"),
        (not 1 <= args.nll_images <= n_held_out, f"--nll-images must be in [1, {n_held_out}]"),
        (not 2 <= args.samples <= n_train // 2,
         f"--samples must be in [2, {n_train // 2}]: the metric's noise is measured between two "
         f"disjoint sets of that many of the {n_train} training images"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


def converge(args, device):
    """Train every variant for every seed (seed-major, so load drifts hit all variants alike);
    results.json is rewritten after every run, and --resume skips the runs it already holds."""
    need("sklearn", "scikit-learn", "the digits")
    need("torch_fidelity", "torch-fidelity", "KID and FD")
    (train_x, train_y), held_out = load_digits_split()
    check_converge_args(args, len(train_x), len(held_out[0]))
    variants = parse_variants(args.variants, args.variant)
    base = {**DIGITS, **({"update_every": 20} if args.long else {}), **parse_overrides(args.set)}
    configs = {name: make_config(args.preset, {**base, **{k: v for k, v in over.items()
                                                           if k not in ("sampler_cls", "table")}})
               for name, over in variants.items()}
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path) and not args.resume:
        raise SystemExit(f"error: {path} exists: pass --resume to continue that study, or choose "
                         "another --out")
    previous = read_results(args.out) if args.resume and os.path.exists(path) else None
    os.makedirs(args.out, exist_ok=True)
    net, accuracy, net_hash = feature_net(held_out, (train_x, train_y),
                                          os.path.join(args.out, "feature_net.pt"))
    metric = SampleMetric(net, train_x, args.samples)
    results = {
        "steps": args.steps, "evals": eval_steps(args.steps, args.evals),
        "config": dataclasses.asdict(make_config(args.preset, base)),
        "eval": {"train_images": len(train_x), "held_out_images": len(held_out[0]),
                 "nll_images": args.nll_images, "samples": args.samples,
                 "ddim_steps": args.ddim_steps, "feature_net": net_hash,
                 "feature_net_accuracy": accuracy},
        "noise": metric.noise(), "clock": "cpu_seconds" if device.type == "cpu" else "wall_seconds",
        "provenance": provenance(device), "variants": list(variants), "runs": [], "complete": False}
    if previous is not None:
        same_study(previous, results, f"{args.out} and this command")
        results["runs"] = previous["runs"]
        results["variants"] = list(dict.fromkeys(previous["variants"] + results["variants"]))
    print(header(results), flush=True)
    evaluate = Evaluator(held_out[0][:args.nll_images], metric, args.ddim_steps)
    done = {(r["variant"], r["seed"]) for r in results["runs"]}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, over in variants.items():
            if (name, seed) in done:
                print(f"  {name:14s} seed {seed}: already in {path}", flush=True)
                continue
            cfg = dataclasses.replace(configs[name], seed=seed)
            sampler_cls = over.get("sampler_cls", ats.AdaptiveTimestepSampler)
            table = over["table"](cfg, results["runs"]) if "table" in over else None
            record, history = train_run(cfg, sampler_cls, train_x, evaluate, results["evals"],
                                        device, name, table, os.path.join(args.out, "weights"))
            results["runs"].append({"variant": name, "seed": seed, **record})
            last = record["curve"][-1]
            print(f"  {name:14s} seed {seed}: NLL {last['nll']:.3f} bpd  "
                  f"KID x1e3 {1e3 * last['kid']:.2f}  FD {last['fd']:.2f}  "
                  f"train {last[results['clock']]:.1f} s  quarters {record['quarters']}",
                  flush=True)
            if history:  # rows = sampler updates, columns = timesteps
                heatmap = os.path.join(args.out, f"policy_{name}_seed{seed}.png")
                train.save_heatmap(history, heatmap, cfg.heatmap_height)
            write_report(results, args.out, quiet=True)
    results["complete"] = True
    return write_report(results, args.out)


# -------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------

QUICK_CONVERGE = {"seeds": 1, "steps": 200, "evals": 2, "nll_images": 8, "samples": 200,
                  "ddim_steps": 20}
LONG_CONVERGE = {"seeds": 3, "steps": 10_000, "evals": 5, "variants": STUDY_VARIANTS}


def parse_args(argv=None):
    c = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto takes the GPU when there is one")
    c.add_argument("--set", default="",
                   help="train.Config overrides for every trainer, e.g. ch=64,dropout=0")
    c.add_argument("--preset", default="tiny", help="base preset; the digits settings override it")
    c.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated names from {list(VARIANTS)}, or 'all' ({ALL_VARIANTS})")
    c.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="define an extra ATS variant, e.g. mine:entropy_coef=0,policy_lr=1e-3")
    c.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    c.add_argument("--first-seed", type=int, default=0, help="the seeds run from this one")
    c.add_argument("--steps", type=int, default=2000)
    c.add_argument("--evals", type=int, default=4, help="evaluation points, evenly spaced")
    c.add_argument("--nll-images", type=int, default=32, help="held-out images for the NLL bound")
    c.add_argument("--samples", type=int, default=749,
                   help="DDIM samples for KID and FD, and real images in their reference")
    c.add_argument("--ddim-steps", type=int, default=50)
    c.add_argument("--quick", action="store_true", help="a small run in a few minutes: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK_CONVERGE.items()))
    c.add_argument("--long", action="store_true", help="the head-to-head, 500 sampler updates: " +
                   ", ".join(f"{k}={v}" for k, v in LONG_CONVERGE.items()) + ", f_S=20")
    c.add_argument("--resume", action="store_true",
                   help="continue the study in --out, skipping the runs it already holds")
    c.add_argument("--out", default="runs/bench", help="output folder")
    args = c.parse_args(argv)
    if args.preset not in train.PRESETS:
        c.error(f"unknown --preset {args.preset!r}: choose from {', '.join(train.PRESETS)}")
    if args.quick or args.long:
        defaults = vars(c.parse_args([]))
        for key, value in (QUICK_CONVERGE if args.quick else LONG_CONVERGE).items():
            if getattr(args, key) == defaults[key]:  # explicit flags still win
                setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    with claimed(args.out):
        return converge(args, ats.pick_device(args.device))


if __name__ == "__main__":
    main()
