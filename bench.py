"""What ATS costs per step, and what it buys against uniform sampling, a placebo and the heuristics
people use instead, measured on the machine at hand.

    python bench.py speed                  # per-step cost of ATS over uniform, and images/s
    python bench.py converge --quick       # the whole study in miniature, in about 3 minutes
    python bench.py converge               # uniform, ATS, its placebo and log-normal on 8x8 digits
    python bench.py converge --long        # the head-to-head: 500 sampler updates, 3 seeds
    python bench.py converge --long --resume --out runs/bench   # continue an interrupted study
    python bench.py report runs/a runs/b --out runs/ab          # one table from runs made apart

converge needs scikit-learn (the digits) and torch-fidelity (KID and FD); matplotlib draws its
curves. Trainers are built by train.build and driven by Trainer.run, so the bench trains exactly
what train.py trains. Training time counts training steps only, never evaluation.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ats
import heuristics
import pictures
import train

HERE = os.path.dirname(os.path.abspath(__file__))

# -------------------------------------------------------------------------------------------------
# Shared helpers
# -------------------------------------------------------------------------------------------------


def parse_overrides(text):
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (values converted later, against train.Config)."""
    pairs = [p for p in (text or "").split(",") if p]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"error: bad override {bad[0]!r}: write key=value, e.g. weighting=min-snr")
    return dict(p.split("=", 1) for p in pairs)


def make_config(preset, overrides):
    """train.Config as train.py resolves it: defaults, preset, then overrides (strings or values).
    """
    defaults = train.Config()
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(defaults)})
    if unknown:
        raise SystemExit(f"error: unknown config key(s) {unknown}: see `python train.py --help`")
    values = dict(overrides)
    for key, value in values.items():
        kind = type(getattr(defaults, key))
        if isinstance(value, str) and kind is not str:
            try:
                values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            except ValueError:
                raise SystemExit(f"error: {key}={value} is not a {kind.__name__}") from None
    cfg = train.resolve({"preset": preset, **values})
    train.check(cfg, world=1)
    return cfg


def build(cfg, device, **kw):
    """train.build, with its setting errors as one line."""
    try:
        return train.build(cfg, device, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def timer(device):
    """A function that runs fn() and returns its seconds: CUDA events on a GPU, else wall-clock."""
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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def random_batch(cfg, device):
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    return (torch.rand(shape, generator=gen) * 2 - 1).to(device)


def provenance(device):
    """What a result was made with: the code (a hash of the sources, and the commit if git knows
    it), torch, the device and the command line."""
    digest = hashlib.sha256()
    for name in ("ats.py", "heuristics.py", "train.py", "bench.py"):
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"code": digest.hexdigest()[:16], "commit": commit, "torch": torch.__version__,
            "device": device_name(device), "argv": sys.argv[1:]}


# -------------------------------------------------------------------------------------------------
# speed: per-step wall time of uniform vs ATS, interleaved, amortised over full f_S cycles
# -------------------------------------------------------------------------------------------------


def speed(args, device):
    """Interleave uniform and ATS cycles (A B A B) after a warm-up cycle each; print the breakdown.
    """
    over = {"T": args.T, "batch_size": args.batch_size, "update_every": args.update_every,
            "num_selected": args.num_selected, "sweep_stride": args.sweep_stride}
    over = {key: value for key, value in over.items() if value is not None}
    if args.quick:  # a small-size path for CPU; explicit flags still win
        over = {"T": 200, "batch_size": 16, "update_every": 10, **over}
    cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
    time_it, every = timer(device), cfg.update_every
    trainers = {s: build(dataclasses.replace(cfg, sampler=s), device) for s in ("uniform", "ats")}
    x0 = random_batch(cfg, device)
    cycle = lambda trainer: [time_it(lambda: trainer.train_step(x0)) for _ in range(every)]
    for trainer in trainers.values():                               # warm-up; probe step first
        cycle(trainer)
    cycles = {name: [] for name in trainers}
    for _ in range(args.cycles):
        for name, trainer in trainers.items():
            cycles[name].append(cycle(trainer))
    policy = trainers["ats"].sampler
    policy_s = statistics.median(time_it(lambda: policy.sample(x0)) for _ in range(20))
    result = report_speed(cfg, cycles, policy_s, device)
    if args.profile and not args.throughput:  # else the last throughput row is profiled
        save_profile(trainers["ats"], x0, args.profile, device, every, "one f_S cycle of ATS")
    return result


def report_speed(cfg, cycles, policy_s, device):
    """Print and return the per-step medians, the ratio and where ATS's extra time goes."""
    per_step = {n: statistics.median(sum(c) / len(c) for c in cs) for n, cs in cycles.items()}
    ordinary = statistics.median(t for c in cycles["ats"] for t in c[1:])
    uniform = statistics.median(t for c in cycles["uniform"] for t in c)
    probe = statistics.median((c[0] - statistics.median(c[1:] or [0.0])) / sum(c)
                              for c in cycles["ats"])
    B, T, f_S, k, stride = (cfg.batch_size, cfg.T, cfg.update_every, cfg.num_selected,
                            cfg.sweep_stride)
    fwd = 2 * (math.ceil(T / stride) + B * k) / (f_S * 3 * B)
    out = {"device": device_name(device), "T": T, "B": B, "f_S": f_S, "S": k, "stride": stride,
           "uniform_s": per_step["uniform"], "ats_s": per_step["ats"],
           "ratio": per_step["ats"] / per_step["uniform"], "probe_share": probe,
           "policy_ms_ordinary_step": 1e3 * (ordinary - uniform),
           "policy_ms_forward": 1e3 * policy_s,
           "probe_forward_overhead": fwd, "cycles": len(cycles["ats"])}
    print(f"speed on {out['device']}, torch {torch.__version__}: T={T} B={B} f_S={f_S} |S|={k} "
          f"sweep stride {stride}, "
          f"{out['cycles']} interleaved cycles of {f_S} steps each after warm-up")
    print(f"  median time per step  uniform {1e3 * out['uniform_s']:.1f} ms   "
          f"ats {1e3 * out['ats_s']:.1f} ms (amortised over full f_S cycles, probes included)")
    print(f"  ratio ats/uniform     {out['ratio']:.3f}")
    print(f"  probe share of ats    {100 * probe:.1f}% of its cycle time (probe before/after + "
          f"policy update), i.e. +{100 * probe * out['ratio']:.1f}% over uniform; counting "
          f"forwards predicts +{100 * fwd:.1f}% = 2(ceil(T/k)+B|S|)/(3B f_S)")
    print(f"  policy net, ordinary  {out['policy_ms_ordinary_step']:+.2f} ms per step (ats minus "
          f"uniform median), policy forward + draw alone {out['policy_ms_forward']:.2f} ms")
    return out


# -------------------------------------------------------------------------------------------------
# throughput: images/s of uniform training, one row per step of the fast path, and a profile
# -------------------------------------------------------------------------------------------------

# Dense peak TFLOP/s (bf16, fp32 with TF32) from NVIDIA datasheets; the first name found wins.
PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494),
               "A100": (312, 156), "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35)}

# (label, amp, channels_last, compile): eager baselines, then the fast path one step at a time.
SETTINGS = [("eager bf16, NCHW", "bf16", False, False),
            ("eager fp32+TF32, NCHW", "none", False, False),
            ("bf16 + channels_last", "bf16", True, False),
            ("bf16 + channels_last + compile", "bf16", True, True),
            ("eager bf16, NCHW (again)", "bf16", False, False)]


def throughput(cfg, device, warmup, steps, try_compile, profile_path):
    """Images/s of uniform training per setting (cuDNN autotuning and fused Adam are on for every
    CUDA row)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 already
    name = device_name(device)
    peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    flops = flops_per_image(cfg, device)
    print(f"throughput on {name}, torch {torch.__version__}, B={cfg.batch_size}, {warmup} warm-up "
          f"and {steps} timed steps per row; {flops / 1e9:.1f} GFLOP per image (fwd+bwd); dense "
          "peak " + (f"bf16 {peak[0]} / tf32 {peak[1]} TFLOP/s" if peak else "unknown here"))
    rows = []
    for label, amp, channels_last, compiled in SETTINGS:
        if compiled and not try_compile:
            continue
        try:
            setting = dataclasses.replace(cfg, sampler="uniform", amp=amp, compile=compiled)
            trainer = train.build(setting, device, channels_last=channels_last)
            x0 = random_batch(cfg, device)
            for _ in range(warmup):
                trainer.train_step(x0)
            seconds = timer(device)(lambda t=trainer, x=x0: [t.train_step(x) for _ in range(steps)])
        except Exception as e:  # a failing setting (a compile toolchain, say) costs only its row
            print(f"  {label:34s} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        ips = cfg.batch_size * steps / seconds
        tflops = flops * ips / 1e12
        frac = f"{100 * tflops / peak[0 if amp == 'bf16' else 1]:5.1f}% of peak" if peak else ""
        print(f"  {label:34s} {ips:9.1f} images/s {tflops:7.2f} TFLOP/s {frac}")
        rows.append({"label": label, "amp": amp, "channels_last": channels_last,
                     "compile": compiled, "images_s": ips, "tflops": tflops})
    if profile_path and rows:
        save_profile(trainer, x0, profile_path, device, 10, "the last row")
    return rows


def flops_per_image(cfg, device):
    """FLOPs of one training step of the U-Net (forward and backward) per image, as torch counts.
    """
    from torch.utils.flop_counter import FlopCounterMode
    trainer = build(dataclasses.replace(cfg, sampler="uniform", amp="none"), device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(random_batch(cfg, device))
    return counter.get_total_flops() / cfg.batch_size


def check_profile_path(path):
    """Refuse, before any timing, a --profile file that could not be written."""
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if path and (os.path.isdir(path) or not os.path.isdir(folder)
                 or not os.access(folder, os.W_OK)):
        raise SystemExit(f"error: --profile {path}: "
                         + ("it is a folder" if os.path.isdir(path) else
                            f"the folder {folder} does not exist or is not writable")
                         + ": give a file in a writable folder, or --profile '' for none")


def save_profile(trainer, x0, path, device, steps, what):
    """The top kernels of `steps` training steps, as torch.profiler's text table. When the profiler
    records nothing twice (these CUDA wheels' kineto can fail to start on a machine without a
    GPU), cProfile's top functions of the same steps instead, saying so in the file and here."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    note, table = " (torch.profiler recorded no events, twice: cProfile's table instead)", None
    for _ in range(2):
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step(x0)
        if len(prof.key_averages()):
            note, table = "", prof.key_averages().table(sort_by=key, row_limit=30)
            break
    if table is None:
        import cProfile
        import io
        import pstats
        profiler, out = cProfile.Profile(), io.StringIO()
        profiler.runcall(lambda: [trainer.train_step(x0) for _ in range(steps)])
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        table = out.getvalue()
    with open(path, "w") as f:
        f.write(f"{device_name(device)}, torch {torch.__version__}, {steps} steps of {what}"
                f"{note}\n{table}")
    print(f"  profile of {what}: {path}{note}")


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


def seeded(seed):
    return torch.Generator().manual_seed(seed)


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
# converge: the variants, and one training run evaluated at regular steps
# -------------------------------------------------------------------------------------------------


class PlaceboSampler(ats.AdaptiveTimestepSampler):
    """ATS with the same probes, rewards and costs, but its REINFORCE step scores fresh draws
    t'_i ~ pi(. | x0_i) in place of the t_i the model was trained on. Its reward then says nothing
    about t', so whatever it gains over uniform comes from drift, not from learning."""

    def __init__(self, *args, seed=0, device=None, **kw):
        super().__init__(*args, seed=seed, device=device, **kw)
        self.placebo_gen = torch.Generator(device or "cpu").manual_seed(seed + 1)

    def _learn(self, x0, t, reward):
        return super()._learn(x0, self.sample(x0, generator=self.placebo_gen), reward)


class BonusEntropySampler(ats.AdaptiveTimestepSampler):
    """ATS with a separate entropy bonus, -mean(r log pi(t)) - c_ent mean(H): the objective this
    project used before it adopted the released code's. Kept to reproduce that comparison."""

    def policy_loss(self, logp, t, reward):
        entropy = -(logp.exp() * logp).sum(1)
        chosen = logp.gather(1, t[:, None]).squeeze(1)
        return -(reward * chosen).mean() - self.entropy_coef * entropy.mean()


def reward_scaled(factor):
    """ATS with every reward multiplied by `factor`: a control for the reward's scale, which sets
    how strongly the entropy term (fixed c_ent) pulls the policy back toward uniform."""
    class RewardScaledSampler(ats.AdaptiveTimestepSampler):
        def _learn(self, x0, t, reward):
            return super()._learn(x0, t, reward * factor)
    return RewardScaledSampler


class WithoutLastSampler(ats.AdaptiveTimestepSampler):
    """ATS whose S never holds t = T-1: a control for the last VLB term, which dominates the
    bound (and the rewards) under a cosine schedule clipped at beta = 0.999."""

    def f_scores(self, X, y):
        scores = super().f_scores(X, y)
        scores[-1] = -1.0 if self.probed[-1] == self.T - 1 else scores[-1]
        return scores


class RandomInitSampler(ats.AdaptiveTimestepSampler):
    """ATS whose policy's output layer starts from small random weights (std 1e-3) instead of 0:
    a control for the zero init, which blocks every hidden layer's gradient at the first update."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        with torch.no_grad():
            self.policy[-1].weight.normal_(0, 1e-3)


class WarmupSampler(ats.AdaptiveTimestepSampler):
    """ATS whose policy learning rate ramps linearly over its first `warmup` updates."""

    warmup = 10

    def _learn(self, x0, t, reward):
        for group in self.opt.param_groups:
            group["lr"] = self.policy_lr * min(1.0, (self.updates + 1) / self.warmup)
        return super()._learn(x0, t, reward)


class MaxKLSampler(ats.AdaptiveTimestepSampler):
    """ATS whose every policy step is halved (up to 10 times, else undone) until its batch-mean
    KL(new || old) is at most `max_kl` nats."""

    max_kl = 0.01

    def _learn(self, x0, t, reward):
        before = [p.detach().clone() for p in self.policy.parameters()]
        with torch.no_grad():
            logp_old = self.log_probs(x0)
        stats = super()._learn(x0, t, reward)
        kl = stats["kl_step"]
        for halving in range(11):
            if kl <= self.max_kl:
                break
            with torch.no_grad():
                for p, p0 in zip(self.policy.parameters(), before):
                    p.lerp_(p0, 0.5 if halving < 10 else 1.0)     # the 11th pass undoes the step
                logp = self.log_probs(x0)
            kl = (ats.all_reduce((logp.exp() * (logp - logp_old)).sum(1).mean())
                  / ats.rank_and_size()[1]).item()
        return {**stats, "kl_step": kl}


class RewardNormSampler(ats.AdaptiveTimestepSampler):
    """ATS whose rewards are divided by their root mean square (over ranks) at every update."""

    def _learn(self, x0, t, reward):
        rms = (ats.all_reduce(reward.pow(2).mean()) / ats.rank_and_size()[1]).sqrt()
        return super()._learn(x0, t, reward / rms if rms > 0 else reward)


class FreezeSampler(ats.AdaptiveTimestepSampler):
    """ATS for its first `freeze_after` updates, then a fixed table with no more probes: the
    batch-mean policy on the images of the update that froze it. K = 100 updates (step 2,000 at
    f_S = 20): in 10 of the 12 finished 500-update runs with an update record, no later update
    moved the policy by more than 0.1 nats (docs/results.md)."""

    freeze_after = 100

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.table = None

    def sample(self, x0, generator=None):
        if self.table is None:
            return super().sample(x0, generator)
        return torch.multinomial(self.table.to(x0.device), x0.shape[0], replacement=True,
                                 generator=generator)

    @contextlib.contextmanager
    def around_update(self, x0, t, losses=None):
        if self.table is not None:
            self.step += 1
            yield {}
            return
        with super().around_update(x0, t, losses) as stats:
            yield stats
        if self.updates == self.freeze_after:
            self.table = self.probs(x0.float()).mean(0).double().cpu()

    def state_dict(self):
        return {**super().state_dict(), "table": self.table}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.table = state["table"]


def fixed_u(cfg, runs):
    """p(t) proportional to 1 / (u (1 - u)), u = (t + 0.5) / T: the U that a Beta(a, b) policy
    takes at its parameters' floor, a = b = 1e-5."""
    u = (torch.arange(cfg.T, dtype=torch.float64) + 0.5) / cfg.T
    return 1 / (u * (1 - u))


def ats_final(cfg, runs):
    """The final batch-mean policy of this study's ats-paper run with the same seed."""
    run = next((r for r in runs if r["variant"] == "ats-paper" and r["seed"] == cfg.seed), None)
    if run is None or not run["final_p"]:
        raise SystemExit(f"error: ats-frozen seed {cfg.seed} needs the ats-paper run of seed "
                         f"{cfg.seed} in the same study first: list ats-paper before ats-frozen")
    return torch.tensor(run["final_p"], dtype=torch.float64)


# Named variants: train.Config overrides, plus `sampler_cls` for an ATS subclass or `table`, a
# function (config, the study's runs so far) -> a fixed table of timestep probabilities [T].
VARIANTS = {
    "uniform": {"sampler": "uniform"},
    "ats-paper": {"sampler": "ats"},
    "ats-placebo": {"sampler": "ats", "sampler_cls": PlaceboSampler},
    "min-snr": {"sampler": "uniform", "weighting": "min-snr"},
    "lognormal": {"sampler": "lognormal"},
    "p2": {"sampler": "uniform", "weighting": "p2"},
    "speed": {"sampler": "speed", "weighting": "speed"},
    "lsm": {"sampler": "loss-second-moment"},
    "ats-min-snr": {"sampler": "ats", "weighting": "min-snr"},
    "ats-bonus": {"sampler": "ats", "sampler_cls": BonusEntropySampler},
    "ats-stride10": {"sampler": "ats", "sweep_stride": 10},
    "ats-stride50": {"sampler": "ats", "sweep_stride": 50},
    "ats-stride10-f10": {"sampler": "ats", "sweep_stride": 10, "update_every": 10},
    # controls for the causes of the policy's early swings
    "ctl-warmup10": {"sampler": "ats", "sampler_cls": WarmupSampler},
    "ats-max-kl": {"sampler": "ats", "sampler_cls": MaxKLSampler},
    "ats-reward-norm": {"sampler": "ats", "sampler_cls": RewardNormSampler},
    "ctl-random-init": {"sampler": "ats", "sampler_cls": RandomInitSampler},
    "ctl-no-last": {"sampler": "ats", "sampler_cls": WithoutLastSampler},
    "ctl-reward-x1e4": {"sampler": "ats", "sampler_cls": reward_scaled(1e4)},
    "ctl-reward-x1e-4": {"sampler": "ats", "sampler_cls": reward_scaled(1e-4)},
    # is the gain adaptive? fixed tables, and ATS frozen after its first updates
    "fixed-u": {"sampler": "uniform", "table": fixed_u},
    "ats-frozen": {"sampler": "uniform", "table": ats_final},
    "ats-freeze": {"sampler": "ats", "sampler_cls": FreezeSampler},
}
DEFAULT_VARIANTS = "uniform,ats-paper,ats-placebo,lognormal"
ALL_VARIANTS = "uniform,ats-paper,ats-placebo,min-snr,lognormal,p2,speed,lsm,ats-min-snr"
STUDY_VARIANTS = "uniform,ats-paper,ats-placebo,lsm,lognormal,speed"


def parse_variants(names, extra):
    """The variants to run: named ones ('all' for ALL_VARIANTS), plus `name:key=value,...`, an ATS
    variant, or one built on a named variant with `name:base=ats-placebo,key=value,...`."""
    names = ALL_VARIANTS if names == "all" else names
    chosen = {}
    for name in filter(None, names.split(",")):        # '' with --variant: only those
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}: choose from {sorted(VARIANTS)} "
                             "or define one with --variant")
        chosen[name] = dict(VARIANTS[name])
    for spec in extra:
        name, _, text = spec.partition(":")
        over = parse_overrides(text)
        base = over.pop("base", "ats-paper")
        if base not in VARIANTS:
            raise SystemExit(f"error: --variant {name}: unknown base {base!r}: choose from "
                             f"{sorted(VARIANTS)}")
        chosen[name] = {**VARIANTS[base], **over}
    return chosen


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
        trainer.sampler = heuristics.TableSampler(table)
    data = batches(train_x, cfg.batch_size, seeded(cfg.seed))
    log, curve, cpu, wall, updates = pictures.SamplerLog(cfg.heatmap_height), [], 0.0, 0.0, []
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
                pictures.save_heatmap(history, heatmap, cfg.heatmap_height, cfg.heatmap_range)
            write_report(results, args.out, quiet=True)
    results["complete"] = True
    return write_report(results, args.out)


def read_results(folder):
    path = os.path.join(folder, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): it is missing or was "
                         "not written by this version of bench.py converge") from None
    problem = results_problem(results)
    if problem:
        raise SystemExit(f"error: cannot use {path}: {problem}; it was not written by this version "
                         "of bench.py converge, or was edited")
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
    plt = pictures.pyplot() if runs else None
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
    plt = pictures.pyplot()
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
# CLI
# -------------------------------------------------------------------------------------------------

QUICK_CONVERGE = {"seeds": 1, "steps": 200, "evals": 2, "nll_images": 8, "samples": 200,
                  "ddim_steps": 20}
LONG_CONVERGE = {"seeds": 3, "steps": 10_000, "evals": 5, "variants": STUDY_VARIANTS}


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto takes the GPU when there is one")
    common.add_argument("--set", default="",
                        help="train.Config overrides for every trainer, e.g. ch=64,dropout=0")
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", parents=[common],
                       help="per-step time, uniform vs ats; training throughput on CUDA")
    s.add_argument("--preset", default=None, help="model preset (default: cifar10 on CUDA, tiny)")
    s.add_argument("--T", type=int, help="diffusion steps (default: the preset's)")
    s.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    s.add_argument("--update-every", type=int, help="f_S, steps between sampler updates")
    s.add_argument("--num-selected", type=int, help="|S|, timesteps in the reward")
    s.add_argument("--sweep-stride", type=int, help="k, the probe sweeps every k-th timestep")
    s.add_argument("--cycles", type=int, default=3, help="timed f_S cycles per sampler")
    s.add_argument("--quick", action="store_true", help="small sizes for a CPU check")
    s.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure images/s of training per setting (default: on CUDA only)")
    s.add_argument("--tp-warmup", type=int, default=10, help="warm-up steps per throughput row")
    s.add_argument("--tp-steps", type=int, default=50, help="timed steps per throughput row")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="in the throughput table, also try torch.compile")
    s.add_argument("--profile", default="docs/profile.txt",
                   help="write a torch.profiler table of the last throughput row, or without "
                        "--throughput of one f_S cycle of ATS, here ('' for none)")
    c = sub.add_parser("converge", parents=[common],
                       help="uniform, ATS, its placebo and heuristics on sklearn's 8x8 digits")
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
    c.add_argument("--quick", action="store_true", help="a small run in under 3 minutes: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK_CONVERGE.items()))
    c.add_argument("--long", action="store_true", help="the head-to-head, 500 sampler updates: " +
                   ", ".join(f"{k}={v}" for k, v in LONG_CONVERGE.items()) + ", f_S=20")
    c.add_argument("--resume", action="store_true",
                   help="continue the study in --out, skipping the runs it already holds")
    c.add_argument("--out", default="runs/bench", help="output folder")
    r = sub.add_parser("report", help="one table from several converge folders")
    r.add_argument("folders", nargs="+")
    r.add_argument("--out", required=True, help="a new folder for the merged report")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "report":
        return merge(args)
    try:
        device = ats.pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}") from None
    if args.preset is not None and args.preset not in train.PRESETS:
        raise SystemExit(f"error: unknown --preset {args.preset!r}: choose from "
                         f"{', '.join(train.PRESETS)}")
    if args.command == "speed":
        if args.cycles < 1 or args.tp_steps < 1 or args.tp_warmup < 0:
            raise SystemExit("error: --cycles and --tp-steps must be at least 1, --tp-warmup >= 0")
        check_profile_path(args.profile)
        args.preset = args.preset or ("cifar10" if device.type == "cuda" else "tiny")
        if args.throughput is None:
            args.throughput = device.type == "cuda"
        result = speed(args, device)
        if args.throughput:
            over = {"batch_size": args.batch_size} if args.batch_size else {}
            cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
            result["throughput"] = throughput(cfg, device, args.tp_warmup, args.tp_steps,
                                              args.compile, args.profile)
        return result
    if args.quick or args.long:
        defaults = vars(parse_args(["converge"]))
        for key, value in (QUICK_CONVERGE if args.quick else LONG_CONVERGE).items():
            if getattr(args, key) == defaults[key]:  # explicit flags still win
                setattr(args, key, value)
    return converge(args, device)


if __name__ == "__main__":
    main()
