"""What the lab's scripts share: configs built as train.py builds them, timing, summaries,
provenance, plots, and the claim on an output folder."""

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import statistics
import subprocess
import sys
import time

import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    return train.resolve({"preset": preset, **values})


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
    for name in ("ats.py", "baselines.py", "train.py", "experiments/common.py",
                 "experiments/converge.py", "experiments/variants.py"):
        with open(os.path.join(ROOT, name), "rb") as f:
            digest.update(f.read())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"code": digest.hexdigest()[:16], "commit": commit, "torch": torch.__version__,
            "device": device_name(device), "argv": sys.argv[1:]}




def pyplot():
    """matplotlib's pyplot on its file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def claimed(out):
    """The output folder, created and locked for the block: a second study writing into the
    same folder at the same time is refused, as train.py refuses a second run."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: {out} is in use by another study: wait for it to end, or "
                             "choose another --out") from None
        yield
