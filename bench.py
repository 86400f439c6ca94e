"""What ATS costs per step, and what it buys in convergence, on the machine at hand.

    python bench.py speed                       # per-step time, uniform vs ats (tiny on CPU, cifar10 on CUDA)
    python bench.py speed --T 1000 --B 128 --every 40 --k 3
    python bench.py converge                    # uniform vs ATS variants on sklearn's 8x8 digits, 3 seeds
    python bench.py converge --quick            # the same, small, in under 3 minutes
    python bench.py converge --variant mine:ats_standardize=1,ats_mix=0.1

Both commands build their trainers with train.build, so they time and train exactly what train.py
trains. Wall-clock numbers count training steps only; evaluation is excluded.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import train

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def parse_overrides(text):
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (values converted later, against train.Config)."""
    pairs = [p for p in (text or "").split(",") if p]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"bad override {bad[0]!r}: write key=value, e.g. ats_mix=0.1")
    return dict(p.split("=", 1) for p in pairs)


def make_config(preset, overrides):
    """train.Config as train.py resolves it (defaults, preset, then overrides given as strings or values)."""
    defaults = train.Config()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(defaults)})
    if unknown:
        raise SystemExit(f"unknown config key(s) {unknown}: see `python train.py --help` for the names")
    values = dict(overrides)
    for key, value in values.items():
        kind = type(getattr(defaults, key))
        if isinstance(value, str) and kind is not str:
            values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    cfg = train.resolve({"preset": preset, **values})
    train.check(cfg, world=1)
    return cfg


def synchronizer(device):
    """A function that waits for the device, so that wall-clock timings are honest."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---------------------------------------------------------------------------------------------
# speed: per-step wall time of uniform vs ats, interleaved, amortised over full f_S cycles
# ---------------------------------------------------------------------------------------------


def timings(fn, n, sync):
    """Seconds of each of n calls of fn(), waiting for the device after each."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_cycle(trainer, x0, every, sync):
    """Seconds of each of `every` consecutive steps: one full f_S cycle, probe step first."""
    return timings(lambda: trainer.step(x0), every, sync)


def time_policy(sampler, x0, sync, n=20):
    """Median seconds of one policy forward + draw of t (what ATS adds to an ordinary step)."""
    return statistics.median(timings(lambda: sampler.sample(x0), n, sync))


def speed(args, device):
    """Interleave uniform and ats cycles (A B A B) after one warm-up cycle each; print the breakdown."""
    over = {"T": args.T, "batch_size": args.B, "ats_every": args.every, "ats_k": args.k}
    over = {key: value for key, value in over.items() if value is not None}
    if args.quick:  # a small-size path for CPU; explicit flags still win
        over = {**QUICK_SPEED, **over}
    cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
    sync, every = synchronizer(device), cfg.ats_every
    trainers = {s: train.build(dataclasses.replace(cfg, sampler=s), device) for s in ("uniform", "ats")}
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)             # (B, C, H, W) in [-1, 1]
    for trainer in trainers.values():                                        # warm-up
        time_cycle(trainer, x0, every, sync)
    cycles = {name: [] for name in trainers}
    for _ in range(args.cycles):
        for name, trainer in trainers.items():
            cycles[name].append(time_cycle(trainer, x0, every, sync))
    return report_speed(cfg, cycles, time_policy(trainers["ats"].sampler, x0, sync), device)


def report_speed(cfg, cycles, policy_s, device):
    """Print and return the per-step medians, the ratio and where ATS's extra time goes."""
    per_step = {n: statistics.median(sum(c) / len(c) for c in cs) for n, cs in cycles.items()}
    ordinary = statistics.median(t for c in cycles["ats"] for t in c[1:])
    uniform = statistics.median(t for c in cycles["uniform"] for t in c)
    probe = statistics.median((c[0] - statistics.median(c[1:] or [0.0])) / sum(c) for c in cycles["ats"])
    fwd = 2 * (cfg.T + cfg.batch_size * cfg.ats_k) / (cfg.ats_every * 3 * cfg.batch_size)
    out = {"device": device_name(device), "T": cfg.T, "B": cfg.batch_size, "f_S": cfg.ats_every, "k": cfg.ats_k,
           "uniform_s": per_step["uniform"], "ats_s": per_step["ats"],
           "ratio": per_step["ats"] / per_step["uniform"], "probe_share": probe,
           "policy_ms_ordinary_step": 1e3 * (ordinary - uniform), "policy_ms_forward": 1e3 * policy_s,
           "probe_forward_overhead": fwd, "cycles": len(cycles["ats"])}
    print(f"speed on {out['device']}: T={cfg.T} B={cfg.batch_size} f_S={cfg.ats_every} k={cfg.ats_k}, "
          f"{out['cycles']} interleaved cycles of {cfg.ats_every} steps each after warm-up")
    print(f"  median time per step  uniform {1e3 * out['uniform_s']:.1f} ms   ats {1e3 * out['ats_s']:.1f} ms "
          "(amortised over full f_S cycles, probes included)")
    print(f"  ratio ats/uniform     {out['ratio']:.3f}")
    print(f"  probe share of ats    {100 * out['probe_share']:.1f}% of its cycle time (probe before/after + policy "
          f"update), i.e. +{100 * out['probe_share'] * out['ratio']:.1f}% over uniform; counting forwards "
          f"predicts +{100 * fwd:.1f}% = 2(T+Bk)/(3B f_S)")
    print(f"  policy net, ordinary  {out['policy_ms_ordinary_step']:+.2f} ms per step (ats minus uniform median), "
          f"policy forward + draw alone {out['policy_ms_forward']:.2f} ms")
    return out


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# Throughput of plain training (CUDA by default): images/s, TFLOP/s, fraction of the card's peak
# ---------------------------------------------------------------------------------------------

# Dense peak TFLOP/s (bf16, fp32 with TF32) from NVIDIA datasheets; first substring of the name wins.
PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494), "A100": (312, 156),
               "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35)}


def peak_tflops(name):
    """(bf16, tf32) dense peak for a card name, or None when we don't know the card."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def measure_train(cfg, device, amp, channels_last, compile_model, steps):
    """Images/s and FLOPs per step of uniform training with the given precision, layout and compile."""
    trainer = train.build(dataclasses.replace(cfg, sampler="uniform", amp=amp, compile=compile_model), device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    trainer.model.to(memory_format=layout)
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    x0 = (torch.rand(shape, device=device) * 2 - 1).contiguous(memory_format=layout)
    sync = synchronizer(device)
    for _ in range(3):                                                       # warm-up (compiles, if asked)
        trainer.step(x0)
    flops = None
    if not compile_model:
        with FlopCounterMode(display=False) as counter:
            trainer.step(x0)
        flops = counter.get_total_flops()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(x0)
    sync()
    return cfg.batch_size * steps / (time.perf_counter() - t0), flops


def throughput(cfg, device, steps, try_compile):
    """Train the U-Net in bf16 and fp32+TF32, contiguous and channels_last, then compiled; print a table."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 by default
    name = device_name(device)
    peak = peak_tflops(name)
    print(f"throughput on {name}, B={cfg.batch_size}, {steps} timed steps each; assumed dense peak: "
          + (f"bf16 {peak[0]} / tf32 {peak[1]} TFLOP/s" if peak else "unknown for this device"))
    rows, flops = [], None
    for amp in ("bf16", "none"):
        for channels_last in (False, True):
            row, counted = measure_row(cfg, device, (amp, channels_last, False), steps, flops, peak)
            rows, flops = rows + ([row] if row else []), flops or counted
    eager_bf16 = [r for r in rows if r["amp"] == "bf16"]
    if try_compile and eager_bf16:  # compile the faster bf16 layout
        best = max(eager_bf16, key=lambda r: r["images_s"])
        row, _ = measure_row(cfg, device, ("bf16", best["channels_last"], True), steps, flops, peak)
        rows += [row] if row else []
    if rows:
        best = max(rows, key=lambda r: r["images_s"])
        print(f"  fastest: {best['label']}, channels_last={best['channels_last']}, compile={best['compile']}")
    return rows


def measure_row(cfg, device, setting, steps, flops, peak):
    """Measure one (amp, channels_last, compile) setting and print its line; a failure is printed, not raised,
    so that one bad setting (a compile toolchain problem, say) does not cost the other numbers."""
    amp, channels_last, compiled = setting
    label = "bf16" if amp == "bf16" else "fp32+tf32"
    head = f"  {label:9s} channels_last={channels_last!s:5s} compile={compiled!s:5s}"
    try:
        ips, counted = measure_train(cfg, device, amp, channels_last, compiled, steps)
    except Exception as e:
        print(f"{head} failed: {type(e).__name__}: {str(e)[:300]}")
        return None, None
    flops = flops or counted
    tflops = flops * ips / cfg.batch_size / 1e12 if flops else float("nan")
    frac = tflops / peak[0 if amp == "bf16" else 1] if peak else float("nan")
    gflop = flops / cfg.batch_size / 1e9 if flops else float("nan")
    print(f"{head} {ips:9.1f} images/s {tflops:7.2f} TFLOP/s {100 * frac:5.1f}% of peak "
          f"({gflop:.1f} GFLOP/image fwd+bwd)")
    return {"label": label, "amp": amp, "channels_last": channels_last, "compile": compiled, "images_s": ips,
            "tflops": tflops, "peak_fraction": frac}, counted


# ---------------------------------------------------------------------------------------------
# converge: data, the feature classifier, the Fréchet distance
# ---------------------------------------------------------------------------------------------

# The converge model: a small U-Net on 8x8x1 digits, T=1000 linear, EMA decay for a short run.
DIGITS = {"image_size": 8, "channels": 1, "ch": 32, "ch_mult": "1,2", "num_res": 1, "attn_res": "4",
          "dropout": 0.1, "T": 1000, "schedule": "linear", "batch_size": 64, "lr": 1e-3, "warmup": 100,
          "ema_decay": 0.995, "amp": "none", "compile": False}

# Named variants: train.Config overrides, plus the bench-only flag `released_probe`.
VARIANTS = {
    "uniform": {"sampler": "uniform"},
    "ats-paper": {"sampler": "ats"},
    # issue 6's "best combination", picked on a one-seed screen (seed 100, not a reported seed) of five
    # candidates; see README, Results. It learns fast but trades sample quality for NLL.
    "ats-std-mix50": {"sampler": "ats", "ats_standardize": True, "ats_mix": 0.5},
    "ats-released": {"sampler": "ats", "released_probe": True},
}


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


# ---------------------------------------------------------------------------------------------
# converge: one training run, evaluated at regular checkpoints
# ---------------------------------------------------------------------------------------------


def use_released_probe(trainer):
    """Bench-only: measure the ATS reward as the released code does, with fresh noise per evaluation
    and dropout on (the model stays in train mode), instead of fixed noise in eval mode."""
    model, diffusion = trainer.model, trainer.diffusion
    trainer.sampler.model = None  # the sampler no longer switches the model to eval mode
    trainer.sampler.vlb_fn = lambda x0, t, noise: diffusion.vlb_terms(model, x0, t, torch.randn_like(noise))


def batches(x, batch_size, gen):
    """Endless shuffled minibatches of x; the order depends only on `gen`."""
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) == batch_size:
                yield x[idx]


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
        ema, device = trainer.ema.module.eval(), trainer.device
        gen = torch.Generator().manual_seed(0)                                 # the same draws every time
        nll = trainer.diffusion.nll_bpd(ema, self.nll_x.to(device), batch_size=1000, generator=gen).mean()
        shape = (self.n_samples, *self.nll_x.shape[1:])
        samples = trainer.diffusion.ddim_sample(ema, shape, steps=self.ddim_steps, generator=gen).cpu()
        return {"nll": nll.item(), "fd": frechet_distance(self.classifier.features(samples), self.test_features)}


def train_run(cfg, released, train_x, evaluate, steps, n_evals, seed, device):
    """Train one run; the data order and training noise depend on `seed` only, not on the sampler.
    Returns the curve (step, training seconds, nll, fd) and the sampler's policy record."""
    trainer = train.build(dataclasses.replace(cfg, seed=seed), device)
    if released:
        use_released_probe(trainer)
    data = batches(train_x, cfg.batch_size, torch.Generator().manual_seed(seed))
    step_gen = torch.Generator(device=device).manual_seed(seed)
    checkpoints = {round(steps * (i + 1) / n_evals) for i in range(n_evals)}
    curve, seconds, sync = [], 0.0, synchronizer(device)
    for step in range(1, steps + 1):
        x0 = next(data).to(device)
        t0 = time.perf_counter()
        trainer.step(x0, generator=step_gen)
        sync()
        seconds += time.perf_counter() - t0                                    # training time only
        if step in checkpoints:
            curve.append({"step": step, "seconds": seconds, **evaluate(trainer)})
    sampler = trainer.sampler
    return {"curve": curve, "quarters": sampler.summary().get("quarters")}, getattr(sampler, "history", None)


# ---------------------------------------------------------------------------------------------
# converge: the study, its summary, its table and its plots
# ---------------------------------------------------------------------------------------------


def parse_variants(names, extra):
    """The variants to run: named ones from VARIANTS, plus `name:key=value,...` definitions."""
    chosen = {}
    for name in names.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: choose from {sorted(VARIANTS)} or define one with --variant")
        chosen[name] = dict(VARIANTS[name])
    for spec in extra:
        name, _, text = spec.partition(":")
        over = parse_overrides(text)
        released = over.pop("released_probe", "0").lower() in ("1", "true", "yes")
        chosen[name] = {"sampler": "ats", **over, "released_probe": released}
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
    base = {**DIGITS, **parse_overrides(args.set)}
    clf, acc = get_classifier(train_set, test_set, os.path.join(args.out, "classifier.pt"))
    with torch.no_grad():
        floor = frechet_distance(clf.features(train_set[0]), clf.features(test_set[0]))
    print(f"digits: {len(train_set[0])} train / {len(test_set[0])} test; feature classifier test accuracy "
          f"{100 * acc:.1f}%; real-vs-real FD floor (train vs test features) {floor:.2f}")
    evaluate = Evaluator(test_set[0], clf, args.nll_images, args.samples, args.ddim_steps)
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, over in variants.items():
            over = dict(over)
            released = over.pop("released_probe", False)
            cfg = make_config(args.preset, {**base, **over})
            result, history = train_run(cfg, released, train_set[0], evaluate, args.steps, args.evals, seed, device)
            runs.append({"variant": name, "seed": seed, **result})
            last = result["curve"][-1]
            print(f"  {name:14s} seed {seed}: NLL {last['nll']:.3f} bpd  FD {last['fd']:.2f}  "
                  f"train {last['seconds']:.1f} s  quarters {result['quarters']}")
            if history:  # rows = sampler updates, columns = timesteps
                train.save_heatmap(history, os.path.join(args.out, f"policy_{name}_seed{seed}.png"),
                                   cfg.heatmap_height, cfg.heatmap_range)
    summary = summarise(runs, list(variants))
    results = {"config": dataclasses.asdict(make_config(args.preset, base)), "variants": variants,
               "steps": args.steps, "seeds": args.seeds, "classifier_accuracy": acc, "fd_floor": floor,
               "summary": summary, "runs": runs}
    write_report(results, args.out)
    save_curves(summary, os.path.join(args.out, "curves.png"))
    return results


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
        summary[name] = {"points": points, "quarters": [r["quarters"] for r in runs if r["variant"] == name]}
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
    """results.json plus results.md: the final table and every checkpoint, mean ± std across seeds."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    summary, pm = results["summary"], lambda m, s, f: f"{m:{f}} ± {s:{f}}"
    lines = [f"Digits 8x8, {results['steps']} steps, {results['seeds']} seeds; FD floor (train vs test) "
             f"{results['fd_floor']:.2f}; classifier accuracy {100 * results['classifier_accuracy']:.1f}%.",
             "Speed-up: training seconds an ATS variant needs to reach uniform's final mean value, divided by "
             "uniform's total (< 1 is faster; checked at checkpoints only).", "",
             "| variant | NLL bpd | FD | train s | speed-up NLL | speed-up FD | final quarter masses per seed |",
             "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        p, up = s["points"][-1], s.get("speedup", {})
        fmt = lambda v: "not reached" if v is None else f"{v:.2f}"
        quarters = " / ".join(" ".join(f"{m:.2f}" for m in q) for q in s["quarters"] if q) or "-"
        lines.append(f"| {name} | {pm(p['nll'], p['nll_std'], '.3f')} | {pm(p['fd'], p['fd_std'], '.2f')} | "
                     f"{pm(p['seconds'], p['seconds_std'], '.1f')} | {fmt(up.get('nll'))} | {fmt(up.get('fd'))} | "
                     f"{quarters} |")
    lines += ["", "| variant | step | train s | NLL bpd | FD |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        for p in s["points"]:
            lines.append(f"| {name} | {p['step']} | {p['seconds']:.1f} | {pm(p['nll'], p['nll_std'], '.3f')} | "
                         f"{pm(p['fd'], p['fd_std'], '.2f')} |")
    colours = ", ".join(f"{n}: {c}" for n, c in zip(summary, COLOUR_NAMES))
    lines += ["", f"curves.png: NLL vs steps, NLL vs seconds (top); FD vs steps, FD vs seconds (bottom). {colours}."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


COLOURS = torch.tensor([[0.1, 0.3, 0.9], [0.9, 0.2, 0.1], [0.1, 0.7, 0.2], [0.8, 0.5, 0.0], [0.6, 0.1, 0.7],
                        [0.0, 0.6, 0.7], [0.4, 0.4, 0.4]])
COLOUR_NAMES = ["blue", "red", "green", "orange", "purple", "teal", "grey"]


def draw_panel(series, height=240, width=320, margin=12):
    """A white panel with a frame and one polyline per (xs, ys, colour), axes scaled to fit: (3, H, W)."""
    img = torch.ones(3, height, width)
    img[:, [margin - 1, height - margin], margin - 1:width - margin + 1] = 0
    img[:, margin - 1:height - margin + 1, [margin - 1, width - margin]] = 0
    xs_all = [x for xs, _, _ in series for x in xs]
    ys_all = [y for _, ys, _ in series for y in ys if math.isfinite(y)]
    if not ys_all:
        return img
    x_hi, y_lo, y_hi = max(xs_all) or 1.0, min(ys_all), max(ys_all)
    to_px = lambda x, y: (margin + x / x_hi * (width - 2 * margin - 1),
                          height - margin - 1 - (y - y_lo) / ((y_hi - y_lo) or 1.0) * (height - 2 * margin - 1))
    for i, (xs, ys, colour) in enumerate(series):
        img[:, 2:8, margin + 10 * i:margin + 10 * i + 6] = colour[:, None, None]    # legend swatch, in order
        pts = [to_px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            px = torch.linspace(x0, x1, n).round().long()
            py = torch.linspace(y0, y1, n).round().long()
            for d in (0, 1):  # two pixels thick
                img[:, (py + d).clamp(max=height - 1), px] = colour[:, None]
    return img


def save_curves(summary, path):
    """curves.png: mean curves per variant; NLL (top) and FD (bottom) against steps and seconds."""
    from torchvision.utils import save_image
    panels = []
    for key in ("nll", "fd"):
        for axis in ("step", "seconds"):
            series = [([p[axis] for p in s["points"]], [p[key] for p in s["points"]], COLOURS[i % len(COLOURS)])
                      for i, s in enumerate(summary.values())]
            panels.append(draw_panel(series))
    save_image(torch.stack(panels), path, nrow=2, padding=4, pad_value=0.5)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--set", default="", help="train.Config overrides for every trainer, e.g. ch=64,dropout=0")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", parents=[common], help="per-step time, uniform vs ats; training throughput on CUDA")
    s.add_argument("--preset", default=None, help="model preset (default: cifar10 on CUDA, tiny otherwise)")
    s.add_argument("--T", type=int, help="diffusion steps (default: the preset's)")
    s.add_argument("--B", type=int, help="batch size (default: the preset's)")
    s.add_argument("--every", type=int, help="f_S, steps between sampler updates (default: the preset's)")
    s.add_argument("--k", type=int, help="|S|, timesteps in the reward (default: the preset's)")
    s.add_argument("--cycles", type=int, default=3, help="timed f_S cycles per sampler, interleaved")
    s.add_argument("--quick", action="store_true", help="small sizes for a CPU check (T=200, B=16, f_S=10)")
    s.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure images/s and TFLOP/s of training (default: on CUDA only)")
    s.add_argument("--tp-steps", type=int, default=20, help="timed steps per throughput setting")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="in the throughput table, also try torch.compile (bf16)")
    c = sub.add_parser("converge", parents=[common], help="uniform vs ATS variants on sklearn's 8x8 digits")
    c.add_argument("--preset", default="tiny", help="base preset; the digits model settings override it")
    c.add_argument("--variants", default=",".join(VARIANTS), help=f"named variants to run, from {list(VARIANTS)}")
    c.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="define an extra ATS variant, e.g. mine:ats_standardize=1,ats_mix=0.2 "
                        "(released_probe=1 measures the reward as the released code does)")
    c.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    c.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (use others to screen settings)")
    c.add_argument("--steps", type=int, default=2000)
    c.add_argument("--evals", type=int, default=4, help="evaluation checkpoints, evenly spaced")
    c.add_argument("--nll-images", type=int, default=32, help="fixed held-out images for the NLL bound")
    c.add_argument("--samples", type=int, default=300, help="DDIM samples for the Fréchet distance")
    c.add_argument("--ddim-steps", type=int, default=50)
    c.add_argument("--quick", action="store_true", help="a small run in under 3 minutes")
    c.add_argument("--out", default="runs/bench", help="output directory")
    return p.parse_args(argv)


QUICK_SPEED = {"T": 200, "batch_size": 16, "ats_every": 10}
QUICK_CONVERGE = {"seeds": 1, "steps": 200, "evals": 2, "nll_images": 8,
                  "samples": 200, "ddim_steps": 20}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.command == "speed":
        args.preset = args.preset or ("cifar10" if device.type == "cuda" else "tiny")
        result = speed(args, device)
        if args.throughput if args.throughput is not None else device.type == "cuda":
            cfg = make_config(args.preset, {**({"batch_size": args.B} if args.B else {}), **parse_overrides(args.set)})
            result["throughput"] = throughput(cfg, device, args.tp_steps, args.compile)
        return result
    if args.quick:
        defaults = vars(parse_args(["converge"]))
        for key, value in QUICK_CONVERGE.items():
            if getattr(args, key) == defaults[key]:  # explicit flags still win
                setattr(args, key, value)
    return converge(args, device)


if __name__ == "__main__":
    main()
