"""What ATS costs per step, and what it buys against uniform sampling and the heuristics, on the machine at hand.

    python bench.py speed                        # per-step time, uniform vs ATS (tiny on CPU, cifar10 on CUDA)
    python bench.py speed --T 1000 --batch-size 128 --update-every 40 --num-selected 3
    python bench.py converge                     # uniform, ATS and heuristics on sklearn's 8x8 digits, 3 seeds
    python bench.py converge --variants all      # every named variant
    python bench.py converge --long              # 500 policy updates: uniform, ATS, ATS with the old entropy bonus
    python bench.py report runs/a runs/b --out runs/ab   # one table from runs made apart (e.g. a seed each)

Trainers are built by train.build and driven by Trainer.run, so the bench times and trains exactly what
train.py trains. Wall-clock numbers count training steps only; evaluation is excluded.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ats
import train

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def parse_overrides(text):
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (values converted later, against train.Config)."""
    pairs = [p for p in (text or "").split(",") if p]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"error: bad override {bad[0]!r}: write key=value, e.g. weighting=min-snr")
    return dict(p.split("=", 1) for p in pairs)


def make_config(preset, overrides):
    """train.Config as train.py resolves it (defaults, preset, then overrides given as strings or values)."""
    defaults = train.Config()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(defaults)})
    if unknown:
        raise SystemExit(f"error: unknown config key(s) {unknown}: see `python train.py --help` for the names")
    values = dict(overrides)
    for key, value in values.items():
        kind = type(getattr(defaults, key))
        if isinstance(value, str) and kind is not str:
            values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    cfg = train.resolve({"preset": preset, **values})
    train.check(cfg, world=1)
    return cfg


def timer(device):
    """A function that runs fn() and returns its seconds: CUDA events on a GPU, perf_counter elsewhere."""
    if device.type != "cuda":
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    def run_cuda(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return run_cuda


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def random_batch(cfg, device):
    gen = torch.Generator().manual_seed(cfg.seed)
    return (torch.rand(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1).to(device)


# ---------------------------------------------------------------------------------------------
# speed: per-step wall time of uniform vs ATS, interleaved, amortised over full f_S cycles
# ---------------------------------------------------------------------------------------------


def speed(args, device):
    """Interleave uniform and ATS cycles (A B A B) after a warm-up cycle each; print the breakdown."""
    over = {"T": args.T, "batch_size": args.batch_size, "update_every": args.update_every,
            "num_selected": args.num_selected}
    over = {key: value for key, value in over.items() if value is not None}
    if args.quick:  # a small-size path for CPU; explicit flags still win
        over = {"T": 200, "batch_size": 16, "update_every": 10, **over}
    cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
    time_it, every = timer(device), cfg.update_every
    trainers = {s: train.build(dataclasses.replace(cfg, sampler=s), device) for s in ("uniform", "ats")}
    x0 = random_batch(cfg, device)
    cycle = lambda trainer: [time_it(lambda: trainer.train_step(x0)) for _ in range(every)]  # probe step first
    for trainer in trainers.values():                                        # warm-up
        cycle(trainer)
    cycles = {name: [] for name in trainers}
    for _ in range(args.cycles):
        for name, trainer in trainers.items():
            cycles[name].append(cycle(trainer))
    policy_s = statistics.median(time_it(lambda: trainers["ats"].sampler.sample(x0)) for _ in range(20))
    return report_speed(cfg, cycles, policy_s, device)


def report_speed(cfg, cycles, policy_s, device):
    """Print and return the per-step medians, the ratio and where ATS's extra time goes."""
    per_step = {n: statistics.median(sum(c) / len(c) for c in cs) for n, cs in cycles.items()}
    ordinary = statistics.median(t for c in cycles["ats"] for t in c[1:])
    uniform = statistics.median(t for c in cycles["uniform"] for t in c)
    probe = statistics.median((c[0] - statistics.median(c[1:] or [0.0])) / sum(c) for c in cycles["ats"])
    fwd = 2 * (cfg.T + cfg.batch_size * cfg.num_selected) / (cfg.update_every * 3 * cfg.batch_size)
    out = {"device": device_name(device), "T": cfg.T, "B": cfg.batch_size, "f_S": cfg.update_every,
           "S": cfg.num_selected, "uniform_s": per_step["uniform"], "ats_s": per_step["ats"],
           "ratio": per_step["ats"] / per_step["uniform"], "probe_share": probe,
           "policy_ms_ordinary_step": 1e3 * (ordinary - uniform), "policy_ms_forward": 1e3 * policy_s,
           "probe_forward_overhead": fwd, "cycles": len(cycles["ats"])}
    print(f"speed on {out['device']}: T={cfg.T} B={cfg.batch_size} f_S={cfg.update_every} |S|={cfg.num_selected}, "
          f"{out['cycles']} interleaved cycles of {cfg.update_every} steps each after warm-up")
    print(f"  median time per step  uniform {1e3 * out['uniform_s']:.1f} ms   ats {1e3 * out['ats_s']:.1f} ms "
          "(amortised over full f_S cycles, probes included)")
    print(f"  ratio ats/uniform     {out['ratio']:.3f}")
    print(f"  probe share of ats    {100 * out['probe_share']:.1f}% of its cycle time (probe before/after + policy "
          f"update), i.e. +{100 * out['probe_share'] * out['ratio']:.1f}% over uniform; counting forwards "
          f"predicts +{100 * fwd:.1f}% = 2(T+B|S|)/(3B f_S)")
    print(f"  policy net, ordinary  {out['policy_ms_ordinary_step']:+.2f} ms per step (ats minus uniform median), "
          f"policy forward + draw alone {out['policy_ms_forward']:.2f} ms")
    return out


# ---------------------------------------------------------------------------------------------
# throughput: images/s of uniform training, one row per step of the fast path, and a profile
# ---------------------------------------------------------------------------------------------

# Dense peak TFLOP/s (bf16, fp32 with TF32) from NVIDIA datasheets; first substring of the name wins.
PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494), "A100": (312, 156),
               "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35)}

# (label, amp, channels_last, compile): eager baselines, then the fast path one step at a time.
SETTINGS = [("eager bf16, NCHW", "bf16", False, False), ("eager fp32+TF32, NCHW", "none", False, False),
            ("bf16 + channels_last", "bf16", True, False), ("bf16 + channels_last + compile", "bf16", True, True),
            ("eager bf16, NCHW (again)", "bf16", False, False)]


def throughput(cfg, device, warmup, steps, try_compile, profile_path):
    """Images/s of uniform training per setting (cuDNN autotuning and fused Adam are on for every CUDA row)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 by default
    name = device_name(device)
    peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    flops = flops_per_image(cfg, device)
    print(f"throughput on {name}, torch {torch.__version__}, B={cfg.batch_size}, {warmup} warm-up and {steps} timed "
          f"steps per row; {flops / 1e9:.1f} GFLOP per image (fwd+bwd); dense peak "
          + (f"bf16 {peak[0]} / tf32 {peak[1]} TFLOP/s" if peak else "unknown for this device"))
    rows = []
    for label, amp, channels_last, compiled in SETTINGS:
        if compiled and not try_compile:
            continue
        try:
            trainer = train.build(dataclasses.replace(cfg, sampler="uniform", amp=amp, compile=compiled), device,
                                  channels_last=channels_last)
            x0 = random_batch(cfg, device)
            for _ in range(warmup):
                trainer.train_step(x0)
            seconds = timer(device)(lambda t=trainer, x=x0: [t.train_step(x) for _ in range(steps)])
        except Exception as e:  # one failing setting (a compile toolchain problem, say) must not cost the others
            print(f"  {label:34s} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        ips = cfg.batch_size * steps / seconds
        tflops = flops * ips / 1e12
        frac = f"{100 * tflops / peak[0 if amp == 'bf16' else 1]:5.1f}% of peak" if peak else ""
        print(f"  {label:34s} {ips:9.1f} images/s {tflops:7.2f} TFLOP/s {frac}")
        rows.append({"label": label, "amp": amp, "channels_last": channels_last, "compile": compiled,
                     "images_s": ips, "tflops": tflops})
    if profile_path and rows:
        save_profile(trainer, x0, profile_path, device)
    return rows


def flops_per_image(cfg, device):
    """FLOPs of one training step of the U-Net (forward and backward) per image, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    trainer = train.build(dataclasses.replace(cfg, sampler="uniform", amp="none"), device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(random_batch(cfg, device))
    return counter.get_total_flops() / cfg.batch_size


def save_profile(trainer, x0, path, device):
    """The top kernels of 10 steps of the last setting (casts, transposes, norms, convs), as a text table."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(10):
            trainer.train_step(x0)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"{device_name(device)}, torch {torch.__version__}, 10 steps\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=30))
    print(f"  profile of the last row: {path}")


# ---------------------------------------------------------------------------------------------
# converge: data, the feature classifier, the Fréchet distance
# ---------------------------------------------------------------------------------------------

# The converge model: a small U-Net on 8x8x1 digits, T=1000 linear, EMA decay for a short run.
DIGITS = {"image_size": 8, "channels": 1, "ch": 32, "ch_mult": "1,2", "num_res": 1, "attn_res": "4",
          "dropout": 0.1, "T": 1000, "schedule": "linear", "batch_size": 64, "lr": 1e-3, "warmup": 100,
          "ema_decay": 0.995, "amp": "none", "compile": False}


class BonusEntropySampler(ats.AdaptiveTimestepSampler):
    """ATS with a separate entropy bonus, -mean(r log pi(t)) - c_ent mean(H): the objective this project
    used before it adopted the released code's. Kept to reproduce that comparison."""

    def policy_loss(self, logp, t, reward):
        entropy = -(logp.exp() * logp).sum(1)
        return -(reward * logp.gather(1, t[:, None]).squeeze(1)).mean() - self.entropy_coef * entropy.mean()


# Named variants: train.Config overrides, plus `sampler_cls` for an ATS subclass.
VARIANTS = {
    "uniform": {"sampler": "uniform"},
    "ats-paper": {"sampler": "ats"},
    "min-snr": {"sampler": "uniform", "weighting": "min-snr"},
    "lognormal": {"sampler": "lognormal"},
    "p2": {"sampler": "uniform", "weighting": "p2"},
    "speed": {"sampler": "speed", "weighting": "speed"},
    "lsm": {"sampler": "loss-second-moment"},
    "ats-min-snr": {"sampler": "ats", "weighting": "min-snr"},
    "ats-bonus": {"sampler": "ats", "sampler_cls": BonusEntropySampler},
}
DEFAULT_VARIANTS = "uniform,ats-paper,min-snr,lognormal"
ALL_VARIANTS = "uniform,ats-paper,min-snr,lognormal,p2,speed,lsm,ats-min-snr"


def load_digits_split(test_fraction=1 / 6):
    """sklearn's 8x8 digits in [-1, 1] as (N, 1, 8, 8), split once into train and held-out test."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / digits.images.max() * 2 - 1
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = int(len(x) * test_fraction)
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


class DigitClassifier(nn.Module):
    """Two conv layers and an MLP; `features` is the penultimate layer the Fréchet distance uses."""

    def __init__(self, in_ch, n_classes, width=64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, width), nn.ReLU())
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def get_classifier(train_set, test_set, path, epochs=20, seed=0):
    """Train the feature classifier once (seeded) and cache it at `path`, so every run shares it."""
    x, y = train_set
    torch.manual_seed(seed)
    clf = DigitClassifier(x.shape[1], int(y.max()) + 1)
    if os.path.isfile(path):
        clf.load_state_dict(torch.load(path, weights_only=True))
    else:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(clf(x[idx]), y[idx]).backward()
                opt.step()
        torch.save(clf.state_dict(), path)
    clf.eval()
    with torch.no_grad():
        acc = (clf(test_set[0]).argmax(1) == test_set[1]).float().mean().item()
    return clf, acc


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two feature sets, in float64."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    vals, vecs = torch.linalg.eigh(s1)
    root1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    tr_sqrt = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


class Evaluator:
    """Held-out NLL bound (fixed test images, fixed noise) and classifier-feature FD of DDIM samples,
    both from the EMA weights."""

    def __init__(self, test_x, classifier, n_nll, n_samples, ddim_steps):
        self.nll_x, self.classifier = test_x[:n_nll], classifier
        self.n_samples, self.ddim_steps = n_samples, ddim_steps
        with torch.no_grad():
            self.test_features = classifier.features(test_x)

    @torch.no_grad()
    def __call__(self, trainer):
        ema, device = trainer.ema, trainer.device
        gen = torch.Generator().manual_seed(0)                                 # the same draws every time
        nll = trainer.diffusion.nll_bpd(ema, self.nll_x.to(device), batch_size=1000, generator=gen).mean()
        shape = (self.n_samples, *self.nll_x.shape[1:])
        samples = trainer.diffusion.ddim_sample(ema, shape, steps=self.ddim_steps, generator=gen).cpu()
        return {"nll": nll.item(), "fd": frechet_distance(self.classifier.features(samples), self.test_features)}


# ---------------------------------------------------------------------------------------------
# converge: one training run, evaluated at regular checkpoints
# ---------------------------------------------------------------------------------------------


def batches(x, batch_size, gen):
    """Endless shuffled minibatches of x; the order depends only on `gen`."""
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield x[idx]


def train_run(cfg, sampler_cls, train_x, evaluate, steps, n_evals, device):
    """One run; data order, initial weights and training noise depend on cfg.seed only, not on the variant.
    Returns the curve (step, training seconds, nll, fd) and the policy's record (ATS only)."""
    trainer = train.build(cfg, device, sampler_cls=sampler_cls)
    data = batches(train_x, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    checkpoints = {round(steps * (i + 1) / n_evals) for i in range(n_evals)}
    log, curve, seconds = train.SamplerLog(cfg.heatmap_height), [], 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tic = time.perf_counter()
    for _ in trainer.run(data, steps):
        sync()
        seconds += time.perf_counter() - tic                                   # training time only
        if trainer.sampler_stats:
            log.record(trainer.step - 1, trainer.sampler_stats, cfg.update_every)
        if trainer.step in checkpoints:
            curve.append({"step": trainer.step, "seconds": seconds, **evaluate(trainer)})
        tic = time.perf_counter()
    return {"curve": curve, "quarters": log.summary.get("quarters")}, log.history


# ---------------------------------------------------------------------------------------------
# converge: the study, its summary, its table and its plots
# ---------------------------------------------------------------------------------------------


def parse_variants(names, extra):
    """The variants to run: named ones from VARIANTS ('all' for ALL_VARIANTS), plus `name:key=value,...`."""
    names = ALL_VARIANTS if names == "all" else names
    chosen = {}
    for name in names.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}: choose from {sorted(VARIANTS)} or define one "
                             "with --variant")
        chosen[name] = dict(VARIANTS[name])
    for spec in extra:
        name, _, text = spec.partition(":")
        chosen[name] = {"sampler": "ats", **parse_overrides(text)}
    return chosen


def converge(args, device):
    """Train every variant for every seed (seed-major, so load drifts hit all variants alike); report."""
    try:
        train_set, test_set = load_digits_split()
    except ImportError:
        print("converge skipped: scikit-learn is not installed (pip install scikit-learn); it provides the digits")
        return None
    os.makedirs(args.out, exist_ok=True)
    variants = parse_variants(args.variants, args.variant)
    base = {**DIGITS, **({"update_every": 20} if args.long else {}), **parse_overrides(args.set)}
    configs = {name: make_config(args.preset, {**base, **{k: v for k, v in over.items() if k != "sampler_cls"}})
               for name, over in variants.items()}
    clf, acc = get_classifier(train_set, test_set, os.path.join(args.out, "classifier.pt"))
    with torch.no_grad():
        floor = frechet_distance(clf.features(train_set[0]), clf.features(test_set[0]))
    print(f"digits: {len(train_set[0])} train / {len(test_set[0])} test; feature classifier test accuracy "
          f"{100 * acc:.1f}%; real-vs-real FD floor (train vs test features) {floor:.2f}", flush=True)
    evaluate = Evaluator(test_set[0], clf, args.nll_images, args.samples, args.ddim_steps)
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, over in variants.items():
            cfg = dataclasses.replace(configs[name], seed=seed)
            sampler_cls = over.get("sampler_cls", ats.AdaptiveTimestepSampler)
            result, history = train_run(cfg, sampler_cls, train_set[0], evaluate, args.steps, args.evals, device)
            runs.append({"variant": name, "seed": seed, **result})
            last = result["curve"][-1]
            print(f"  {name:14s} seed {seed}: NLL {last['nll']:.3f} bpd  FD {last['fd']:.2f}  "
                  f"train {last['seconds']:.1f} s  quarters {result['quarters']}", flush=True)
            if history:  # rows = sampler updates, columns = timesteps
                train.save_heatmap(history, os.path.join(args.out, f"policy_{name}_seed{seed}.png"),
                                   cfg.heatmap_height, cfg.heatmap_range)
    results = {"config": dataclasses.asdict(make_config(args.preset, base)), "variants": list(variants),
               "steps": args.steps, "classifier_accuracy": acc, "fd_floor": floor, "runs": runs}
    return write_report(results, args.out)


def summarise(runs, names):
    """Mean and std across seeds at every checkpoint, and the wall-clock speed-up against uniform."""
    summary = {}
    for name in names:
        curves = [r["curve"] for r in runs if r["variant"] == name]
        points = []
        for i, point in enumerate(curves[0]):
            row = {"step": point["step"]}
            for key in ("seconds", "nll", "fd"):
                row[key], row[key + "_std"] = mean_std([c[i][key] for c in curves])
            points.append(row)
        summary[name] = {"points": points, "seeds": [r["seed"] for r in runs if r["variant"] == name],
                         "quarters": [r["quarters"] for r in runs if r["variant"] == name]}
    if "uniform" in summary:
        final = summary["uniform"]["points"][-1]
        for s in summary.values():
            s["speedup"] = {key: time_to_reach(s["points"], key, final[key], final["seconds"])
                            for key in ("nll", "fd")}
    return summary


def time_to_reach(points, key, target, total):
    """Mean training seconds at the first checkpoint whose mean `key` <= target, over `total`; None if never."""
    return next((p["seconds"] / total for p in points if p[key] <= target), None)


def write_report(results, out):
    """results.json, results.md (the final table and every checkpoint, mean ± std across seeds), curves.png."""
    results["summary"] = summary = summarise(results["runs"], results["variants"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    pm = lambda m, s, f: f"{m:{f}} ± {s:{f}}"
    lines = [f"Digits 8x8, {results['steps']} steps; FD floor (train vs test) {results['fd_floor']:.2f}; "
             f"classifier accuracy {100 * results['classifier_accuracy']:.1f}%.",
             "Speed-up: training seconds a variant needs to reach uniform's final mean value, divided by "
             "uniform's total (< 1 is faster; checked at checkpoints only).", "",
             "| variant | seeds | NLL bpd | FD | train s | speed-up NLL | speed-up FD | quarter masses |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        p, up = s["points"][-1], s.get("speedup", {})
        fmt = lambda v: "not reached" if v is None else f"{v:.2f}"
        quarters = " / ".join(" ".join(f"{m:.2f}" for m in q) for q in s["quarters"] if q) or "-"
        lines.append(f"| {name} | {','.join(map(str, s['seeds']))} | {pm(p['nll'], p['nll_std'], '.3f')} | "
                     f"{pm(p['fd'], p['fd_std'], '.2f')} | {pm(p['seconds'], p['seconds_std'], '.1f')} | "
                     f"{fmt(up.get('nll'))} | {fmt(up.get('fd'))} | {quarters} |")
    lines += ["", "| variant | step | train s | NLL bpd | FD |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        for p in s["points"]:
            lines.append(f"| {name} | {p['step']} | {p['seconds']:.1f} | {pm(p['nll'], p['nll_std'], '.3f')} | "
                         f"{pm(p['fd'], p['fd_std'], '.2f')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    save_curves(summary, os.path.join(out, "curves.png"))
    return results


def save_curves(summary, path):
    """curves.png: mean NLL (top) and FD (bottom) against steps (left) and training seconds (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, key in zip(axes, ("nll", "fd")):
        for ax, axis in zip(row, ("step", "seconds")):
            for name, s in summary.items():
                ax.plot([p[axis] for p in s["points"]], [p[key] for p in s["points"]], marker="o", label=name)
            ax.set_xlabel("training steps" if axis == "step" else "training seconds")
            ax.set_ylabel("held-out NLL bound (bits/dim)" if key == "nll" else "FD (classifier features)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(args):
    """One report from several converge output folders (for example one seed each, run side by side)."""
    parts = []
    for folder in args.folders:
        try:
            with open(os.path.join(folder, "results.json")) as f:
                parts.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {folder}/results.json ({type(e).__name__}): "
                             "run converge there first") from None
    if len({p["steps"] for p in parts}) > 1 or len({json.dumps(p["config"]) for p in parts}) > 1:
        raise SystemExit("error: the folders ran different steps or base configs; merge only like with like")
    os.makedirs(args.out, exist_ok=True)
    variants = list(dict.fromkeys(v for p in parts for v in p["variants"]))  # union, in order of appearance
    return write_report({**parts[0], "variants": variants, "runs": [r for p in parts for r in p["runs"]]}, args.out)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

QUICK_CONVERGE = {"seeds": 1, "steps": 200, "evals": 2, "nll_images": 8, "samples": 200, "ddim_steps": 20}
LONG_CONVERGE = {"seeds": 2, "steps": 10_000, "evals": 5, "variants": "uniform,ats-paper,ats-bonus"}


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--set", default="", help="train.Config overrides for every trainer, e.g. ch=64,dropout=0")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", parents=[common], help="per-step time, uniform vs ats; training throughput on CUDA")
    s.add_argument("--preset", default=None, help="model preset (default: cifar10 on CUDA, tiny otherwise)")
    s.add_argument("--T", type=int, help="diffusion steps (default: the preset's)")
    s.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    s.add_argument("--update-every", type=int, help="f_S, steps between sampler updates (default: the preset's)")
    s.add_argument("--num-selected", type=int, help="|S|, timesteps in the reward (default: the preset's)")
    s.add_argument("--cycles", type=int, default=3, help="timed f_S cycles per sampler, interleaved")
    s.add_argument("--quick", action="store_true", help="small sizes for a CPU check (T=200, B=16, f_S=10)")
    s.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure images/s of training per setting (default: on CUDA only)")
    s.add_argument("--tp-warmup", type=int, default=10, help="warm-up steps per throughput setting")
    s.add_argument("--tp-steps", type=int, default=50, help="timed steps per throughput setting")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="in the throughput table, also try torch.compile")
    s.add_argument("--profile", default="docs/profile.txt", help="write a torch.profiler table here ('' for none)")
    c = sub.add_parser("converge", parents=[common], help="uniform, ATS and heuristics on sklearn's 8x8 digits")
    c.add_argument("--preset", default="tiny", help="base preset; the digits model settings override it")
    c.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated names from {list(VARIANTS)}, or 'all' ({ALL_VARIANTS})")
    c.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="define an extra ATS variant, e.g. mine:entropy_coef=0,policy_lr=1e-3")
    c.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    c.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (use others to screen settings)")
    c.add_argument("--steps", type=int, default=2000)
    c.add_argument("--evals", type=int, default=4, help="evaluation checkpoints, evenly spaced")
    c.add_argument("--nll-images", type=int, default=32, help="fixed held-out images for the NLL bound")
    c.add_argument("--samples", type=int, default=300, help="DDIM samples for the Fréchet distance")
    c.add_argument("--ddim-steps", type=int, default=50)
    c.add_argument("--quick", action="store_true", help="a small run in under 3 minutes")
    c.add_argument("--long", action="store_true", help="500 policy updates: " + ", ".join(
        f"{k}={v}" for k, v in LONG_CONVERGE.items()) + ", f_S = 20")
    c.add_argument("--out", default="runs/bench", help="output directory")
    r = sub.add_parser("report", help="one table from several converge output folders (same steps and base config)")
    r.add_argument("folders", nargs="+")
    r.add_argument("--out", required=True, help="output directory for the merged report")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "report":
        return merge(args)
    device = torch.device(args.device)
    if args.command == "speed":
        args.preset = args.preset or ("cifar10" if device.type == "cuda" else "tiny")
        result = speed(args, device)
        if args.throughput if args.throughput is not None else device.type == "cuda":
            over = {"batch_size": args.batch_size} if args.batch_size else {}
            cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
            result["throughput"] = throughput(cfg, device, args.tp_warmup, args.tp_steps, args.compile, args.profile)
        return result
    if args.quick or args.long:
        defaults = vars(parse_args(["converge"]))
        for key, value in (QUICK_CONVERGE if args.quick else LONG_CONVERGE).items():
            if getattr(args, key) == defaults[key]:  # explicit flags still win
                setattr(args, key, value)
    return converge(args, device)


if __name__ == "__main__":
    main()
