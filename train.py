"""Train a DDPM with Adaptive Timestep Sampling (arXiv:2411.09998) on CIFAR-10, an image folder or synthetic shapes.

    python train.py                                   # the released ATS CIFAR-10 setup (quad schedule, ATS)
    python train.py --sampler uniform                 # the same run with uniform t, for a fair comparison
    python train.py --preset tiny                     # offline CPU demo on synthetic shapes, a few minutes
    python train.py --resume --out-dir runs/cifar10   # continue a run (Ctrl-C saves a checkpoint first)
    torchrun --nproc_per_node=2 train.py              # DDP: --batch-size stays the global batch

Every knob is a field of Config; --help lists them all. An explicitly given flag beats the preset.
On --resume only the flags in RESUMABLE may change; any other that differs from the stored run is refused.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as tvt
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import ats
import heuristics

# ---------------------------------------------------------------------------------------------
# Config: one dataclass, argparse generated from it, presets as named overrides
# ---------------------------------------------------------------------------------------------

PRESETS = {
    "cifar10": {},  # the defaults below are the released ATS CIFAR-10 setup
    "tiny": dict(dataset="synthetic", image_size=16, out_dir="runs/tiny", steps=2000, batch_size=32, lr=1e-3,
                 warmup=100, ema_decay=0.99, ch=32, ch_mult="1,2,2", num_res=1, attn_res="", dropout=0.0,
                 log_every=100, ckpt_every=500, sample_every=500, sample_steps=25, workers=0),
}


def opt(default, doc, **argparse_kw):
    """A Config field: its default, its one-line --help, and extra argparse keywords such as choices."""
    return field(default=default, metadata={"help": doc, **argparse_kw})


@dataclass
class Config:
    # run
    preset: str = opt("cifar10", "named set of overrides, applied under explicit flags", choices=tuple(PRESETS))
    out_dir: str = opt("runs/cifar10", "folder for ckpt.pt, grids, log.jsonl, sampler.png and config.json")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt (only the RESUMABLE flags may change)")
    steps: int = opt(800_000, "total training steps")
    seed: int = opt(0, "seed for init, data order, t, noise and the probe")
    device: str = opt("auto", "auto picks cuda when available", choices=("auto", "cuda", "cpu"))
    amp: str = opt("auto", "autocast; auto: bf16/fp16 on CUDA, none on CPU", choices=("auto", "bf16", "fp16", "none"))
    compile: bool = opt(False, "torch.compile the U-Net")
    # data
    dataset: str = opt("cifar10", "training images", choices=("cifar10", "folder", "synthetic"))
    data_dir: str = opt("./data", "where CIFAR-10 lives (or is downloaded to), or the image folder")
    image_size: int = opt(32, "images are resized and centre-cropped to this")
    channels: int = opt(3, "image channels")
    hflip: bool = opt(True, "random horizontal flips")
    synthetic_n: int = opt(10_000, "number of synthetic images")
    on_device: str = opt("auto", "keep the decoded dataset in device memory; auto: if it takes <= 25%%",
                         choices=("auto", "yes", "no"))
    workers: int = opt(4, "data-loading worker processes (when the data is not kept on the device)")
    # diffusion and U-Net
    T: int = opt(1000, "diffusion timesteps")
    schedule: str = opt("quad", "beta schedule", choices=("linear", "quad", "cosine"))
    var_type: str = opt("large", "reverse variance: large = beta_t, small = posterior", choices=("large", "small"))
    ch: int = opt(128, "U-Net base channels")
    ch_mult: str = opt("1,2,2,2", "channel multiplier per resolution level, comma-separated")
    num_res: int = opt(2, "residual blocks per level")
    attn_res: str = opt("16", "feature-map sizes with self-attention, comma-separated, may be empty")
    dropout: float = opt(0.1, "U-Net dropout")
    # optimisation
    batch_size: int = opt(128, "global batch; each of N processes gets batch_size / N")
    lr: float = opt(2e-4, "Adam learning rate")
    warmup: int = opt(5000, "linear learning-rate warmup steps")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    ema_decay: float = opt(0.9999, "EMA decay of the weights used for samples")
    # timestep sampler and loss weighting
    sampler: str = opt("ats", "timestep sampler: ATS or a heuristic", choices=("ats", *heuristics.SAMPLERS))
    weighting: str = opt("none", "weight on the per-sample L_simple", choices=heuristics.WEIGHTINGS)
    update_every: int = opt(40, "f_S: ATS sampler update every this many steps")
    num_selected: int = opt(3, "|S|: timesteps in the ATS reward")
    queue_size: int = opt(20, "Q: queue of T-sweeps for the ATS feature selection")
    policy_lr: float = opt(1e-2, "Adam learning rate of the ATS policy")
    entropy_coef: float = opt(1e-2, "c_ent: entropy coefficient in the ATS reward")
    policy_grad_clip: float = opt(1.0, "gradient-norm clip of the ATS policy")
    probe_batch: int = opt(256, "forwards per chunk in the ATS probe")
    lognormal_mean: float = opt(-1.2, "P_mean of --sampler lognormal (log sigma)")
    lognormal_std: float = opt(1.2, "P_std of --sampler lognormal")
    snr_gamma: float = opt(5.0, "gamma of --weighting min-snr")
    # outputs
    log_every: int = opt(100, "steps between log lines")
    ckpt_every: int = opt(5000, "steps between checkpoints (one is also written at the end)")
    milestone_every: int = opt(0, "steps between kept copies ckpt_<step>.pt; 0: none")
    sample_every: int = opt(10_000, "steps between EMA sample grids and heatmaps (also at the end)")
    sample_n: int = opt(64, "images in each grid")
    sample_steps: int = opt(100, "DDIM steps for the grids")
    heatmap_height: int = opt(256, "pixel height of the sampler heatmap")
    heatmap_range: float = opt(10.0, "heatmap colours span pi(t) from uniform/R to uniform*R, log scale")


# What may change on --resume; every other flag must match the stored run.
RESUMABLE = {"resume", "out_dir", "steps", "device", "amp", "compile", "workers", "on_device", "lr", "policy_lr",
             "log_every", "ckpt_every", "milestone_every", "sample_every", "sample_n", "sample_steps",
             "heatmap_height", "heatmap_range"}
MAX_CKPT_LOSS = 2.0  # a checkpoint is written only if its weights' L_simple is finite and below this (zero noise: 1)


def parse_args(argv=None):
    """The flags given explicitly on the command line, as a dict. argparse is generated from Config."""
    epilog = "presets: " + "; ".join(f"{name} = " + (", ".join(f"{k}={v}" for k, v in over.items()) or "the defaults")
                                     for name, over in PRESETS.items())
    epilog += ". On --resume only these may change: " + ", ".join(f"--{n.replace('_', '-')}" for n in sorted(RESUMABLE))
    p = argparse.ArgumentParser(description=__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        kw = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} [{f.default}]", **kw, **extra)
    return vars(p.parse_args(argv))


def resolve(explicit):
    """Config = defaults, then the preset's overrides, then the explicit flags."""
    return Config(**{**PRESETS[explicit.get("preset", Config.preset)], **explicit})


def parse_config(argv=None):
    return resolve(parse_args(argv))


def config_from_dict(d):
    """Config from a stored dict (config.json or a checkpoint); unknown keys are ignored."""
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


def ints(s, flag="a list"):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: {flag} expects comma-separated integers, got {s!r}") from None


def check(cfg, world):
    """Refuse impossible settings with one line each, before anything is built or written."""
    mult, attn = ints(cfg.ch_mult, "--ch-mult"), ints(cfg.attn_res, "--attn-res")
    sizes = [cfg.image_size // 2**i for i in range(len(mult))]
    positive = lambda v: math.isfinite(v) and v > 0
    problems = [
        (min(cfg.batch_size, cfg.image_size, cfg.channels, cfg.num_res, cfg.synthetic_n, cfg.probe_batch) < 1,
         "--batch-size, --image-size, --channels, --num-res, --synthetic-n and --probe-batch must be at least 1"),
        (cfg.batch_size % world != 0, f"--batch-size {cfg.batch_size} does not divide over {world} processes"),
        (cfg.ch < 4 or cfg.ch % 2, f"--ch must be an even number of at least 4, got {cfg.ch}"),
        (not mult or min(mult) < 1, f"--ch-mult needs positive multipliers such as 1,2,2, got {cfg.ch_mult!r}"),
        (mult and cfg.image_size % 2 ** (len(mult) - 1) != 0,
         f"--image-size {cfg.image_size} must be divisible by 2^{len(mult) - 1} for --ch-mult {cfg.ch_mult}"),
        (bool(set(attn) - set(sizes)), f"--attn-res {cfg.attn_res} names sizes no level has: they are {sizes}"),
        (cfg.T < 2, f"--T must be at least 2, got {cfg.T}"),
        (not 1 <= cfg.num_selected <= cfg.T, f"--num-selected must be in [1, T={cfg.T}], got {cfg.num_selected}"),
        (cfg.update_every < 1 or cfg.queue_size < 3, "--update-every must be at least 1 and --queue-size at least 3"),
        (not all(map(positive, (cfg.lr, cfg.policy_lr, cfg.grad_clip, cfg.policy_grad_clip))),
         "--lr, --policy-lr, --grad-clip and --policy-grad-clip must be finite and positive"),
        (not all(map(positive, (cfg.lognormal_std, cfg.snr_gamma))) or not math.isfinite(cfg.lognormal_mean),
         "--lognormal-std and --snr-gamma must be finite and positive, --lognormal-mean finite"),
        (not (math.isfinite(cfg.entropy_coef) and cfg.entropy_coef >= 0), "--entropy-coef must be finite, >= 0"),
        (not 0 <= cfg.ema_decay <= 1 or not 0 <= cfg.dropout < 1, "--ema-decay must be in [0, 1], --dropout in [0, 1)"),
        (min(cfg.warmup, cfg.workers, cfg.milestone_every) < 0, "--warmup, --workers, --milestone-every must be >= 0"),
        (min(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.sample_every, cfg.sample_n, cfg.heatmap_height) < 1,
         "--steps, --sample-n, --heatmap-height and the --*-every intervals must be at least 1"),
        (not 1 <= cfg.sample_steps <= cfg.T, f"--sample-steps must be in [1, T={cfg.T}]"),
        (not (math.isfinite(cfg.heatmap_range) and cfg.heatmap_range > 1), "--heatmap-range must be above 1"),
        (cfg.dataset == "cifar10" and cfg.channels != 3, "cifar10 is RGB: use --channels 3"),
        (cfg.dataset == "folder" and cfg.channels not in (1, 3), "--dataset folder reads grey (1) or RGB (3) images"),
        (cfg.dataset == "folder" and not os.path.isdir(cfg.data_dir),
         f"--data-dir {cfg.data_dir!r} does not exist or is not a folder"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Data: uint8 (N, C, H, W) images, kept on the device when they fit, else streamed from disk
# ---------------------------------------------------------------------------------------------


def synthetic_shapes(n, size, channels, seed):
    """n images of a disc and a square on gradient backgrounds, from `seed` alone: uint8 (n, C, size, size)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, 1, 1, generator=g)              # (..., 1, 1), broadcasts to pixels
    yy, xx = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    img = rand(n, channels) * (1 - yy) + rand(n, channels) * yy               # (n, C, H, W), top-to-bottom gradient
    for square in (False, True):
        cx, cy, r = 0.2 + 0.6 * rand(n, 1), 0.2 + 0.6 * rand(n, 1), 0.1 + 0.2 * rand(n, 1)   # (n, 1, 1, 1)
        dx, dy = (xx - cx).abs(), (yy - cy).abs()
        inside = torch.maximum(dx, dy) < r if square else dx**2 + dy**2 < r**2
        img = torch.where(inside, rand(n, channels), img)
    return (img * 255).round().to(torch.uint8)


class UnreadableImage(Exception):
    """An image file that PIL cannot decode; train.py stops with one line naming it."""


class ImageFiles(Dataset):
    """Every image under `root` (recursively), as grey or RGB, resized and centre-cropped: uint8 (C, H, W)."""

    def __init__(self, root, size, channels):
        exts = torchvision.datasets.folder.IMG_EXTENSIONS
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(exts))
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = tvt.Compose([tvt.Resize(size), tvt.CenterCrop(size), tvt.PILToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert(self.mode))
        except OSError as e:
            raise UnreadableImage(f"cannot read image {self.files[i]} ({e}): remove or replace it") from None


def make_dataset(cfg):
    """A uint8 (N, C, H, W) tensor (synthetic, CIFAR-10) or a map-style dataset of uint8 (C, H, W) images (folder)."""
    if cfg.dataset == "synthetic":
        return synthetic_shapes(cfg.synthetic_n, cfg.image_size, cfg.channels, cfg.seed)
    if cfg.dataset == "folder":
        data = ImageFiles(cfg.data_dir, cfg.image_size, cfg.channels)
        if len(data) == 0:
            raise SystemExit(f"error: no images found under --data-dir {cfg.data_dir!r}")
        return data
    try:
        data = torchvision.datasets.CIFAR10(cfg.data_dir, train=True, download=True)
    except Exception as e:  # no network, a proxy, a full disk: all end the same way
        raise SystemExit(f"error: CIFAR-10 is not in {cfg.data_dir!r} and could not be downloaded "
                         f"({type(e).__name__}). Put cifar-10-python.tar.gz from "
                         "https://www.cs.toronto.edu/~kriz/cifar.html into that folder (or point --data-dir at it), "
                         "or train offline with --dataset synthetic or --dataset folder.") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)                 # (50000, 3, 32, 32) uint8
    if cfg.image_size != 32:
        images = tvt.Resize(cfg.image_size, antialias=True)(images)         # square in, square out
    return images.contiguous()


def fits_on_device(cfg, n, device):
    """Whether n decoded images take at most a quarter of the device's memory (or --on-device yes/no)."""
    if cfg.on_device != "auto":
        return cfg.on_device == "yes"
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return n * cfg.channels * cfg.image_size**2 <= total / 4


def batch_indices(n, per_rank, rank, world, seed, start_step):
    """Endless lists of per-rank image indices. Epoch e is DistributedSampler's order e, so a resumed run
    picks up in place; the last incomplete batch of each epoch is dropped."""
    order = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(order) // per_rank
    if per_epoch == 0:
        raise SystemExit(f"error: {n} images are fewer than one batch of {per_rank * world}")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order.set_epoch(epoch)
        idx = list(order)
        for b in range(skip, per_epoch):
            yield idx[b * per_rank:(b + 1) * per_rank]
        epoch, skip = epoch + 1, 0


def batches(cfg, data, indices, device):
    """uint8 batches on `device`: indexed from a resident tensor, or loaded by DataLoader workers."""
    if isinstance(data, torch.Tensor):
        data = data.to(device)
        return (data[torch.tensor(i, device=device)] for i in indices)
    loader = DataLoader(data, batch_sampler=indices, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    return (b.to(device, non_blocking=True) for b in loader)


def load_data(cfg, device):
    """The dataset, decoded into one uint8 tensor when it fits on the device (--on-device)."""
    data = make_dataset(cfg)
    if not isinstance(data, torch.Tensor) and fits_on_device(cfg, len(data), device):
        data = torch.stack([data[i] for i in range(len(data))])              # decodes every file once, now
    return data


# ---------------------------------------------------------------------------------------------
# Model, sampler and trainer
# ---------------------------------------------------------------------------------------------


def build(cfg, device, sampler_cls=ats.AdaptiveTimestepSampler, **trainer_kw):
    """U-Net, diffusion, timestep sampler and Trainer (trainer_kw: e.g. channels_last). Same seed, same weights."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # fp32 matmuls (the probe's attention) use TF32, as cuDNN convolutions do already
        torch.backends.cuda.matmul.allow_tf32 = True
    model = ats.UNet(in_ch=cfg.channels, ch=cfg.ch, ch_mult=ints(cfg.ch_mult), num_res=cfg.num_res,
                     attn_res=ints(cfg.attn_res), dropout=cfg.dropout, image_size=cfg.image_size).to(device)
    diffusion = ats.GaussianDiffusion(T=cfg.T, schedule=cfg.schedule, var_type=cfg.var_type).to(device)
    if cfg.sampler == "ats":
        sampler = sampler_cls(
            cfg.T, lambda x0, t, noise: diffusion.vlb_terms(model, x0, t, noise), cfg.channels, model=model,
            update_every=cfg.update_every, num_selected=cfg.num_selected, queue_size=cfg.queue_size,
            policy_lr=cfg.policy_lr, entropy_coef=cfg.entropy_coef, policy_grad_clip=cfg.policy_grad_clip,
            probe_batch=cfg.probe_batch, seed=cfg.seed, device=device)
    else:
        sampler = heuristics.make_sampler(cfg.sampler, cfg.T, diffusion.abar.cpu(), cfg.lognormal_mean,
                                          cfg.lognormal_std)
    weights = heuristics.loss_weights(cfg.weighting, diffusion.abar.cpu(), snr_gamma=cfg.snr_gamma)
    return ats.Trainer(model, diffusion, sampler, lr=cfg.lr, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                       ema_decay=cfg.ema_decay, amp=cfg.amp, compile=cfg.compile, loss_weights=weights, seed=cfg.seed,
                       **trainer_kw)


# ---------------------------------------------------------------------------------------------
# Outputs: log lines, sample grids and the sampler heatmap, drawn with torchvision alone
# ---------------------------------------------------------------------------------------------

HEAT = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.0, 0.55], [1.0, 0.45, 0.0], [1.0, 1.0, 0.7]])  # black..pale yellow


class SamplerLog:
    """Where the ATS policy put its mass: the last update's summary and a thinned history for the heatmap."""

    def __init__(self, rows, state=None):
        self.rows, self.history, self.steps, self.every, self.summary = rows, [], [], 1, {}
        if state:
            self.history, self.steps = list(state["history"]), list(state["steps"])
            self.every, self.summary = state["every"], state["summary"]

    def record(self, step, stats, update_every):
        """Keep the summary of an update, and every `every`-th update's pi(t), halving the rows when full."""
        p, T = stats["p"], len(stats["p"])
        t, q = torch.arange(T), T / 4
        self.summary = {"mean_t": float((p * t).sum()), "S": stats["S"], "reward": stats["reward"],
                        "quarters": [round(float(p[(t >= i * q) & (t < (i + 1) * q)].sum()), 3) for i in range(4)]}
        if step // update_every % self.every == 0:
            self.history.append(p)
            self.steps.append(step)
            if len(self.history) > self.rows:
                self.history, self.steps, self.every = self.history[::2], self.steps[::2], self.every * 2

    def state_dict(self):
        return {"history": self.history, "steps": self.steps, "every": self.every, "summary": self.summary}


@torch.no_grad()
def save_grid(cfg, trainer, path):
    """EMA samples by DDIM, from the same noise every time so that grids compare across steps."""
    shape = (cfg.sample_n, cfg.channels, cfg.image_size, cfg.image_size)
    with ats.autocast(trainer.device, cfg.amp):
        x = trainer.diffusion.ddim_sample(trainer.ema, shape, steps=cfg.sample_steps,
                                          generator=torch.Generator().manual_seed(cfg.seed))
    torchvision.utils.save_image((x.float() + 1) / 2, path, nrow=math.ceil(math.sqrt(cfg.sample_n)))


def save_heatmap(history, path, height, spread):
    """pi(t) over training: rows are sampler updates (first at the top), columns t, colour probability.

    The colour is log(pi(t) T) on [-log spread, log spread]: uniform sits mid-ramp, brighter is likelier.
    """
    p = torch.stack(history).float()                                    # (updates, T)
    v = ((p * p.shape[1]).log() / math.log(spread) + 1) / 2               # 0.5 = uniform
    pos = v.clamp(0, 1) * (len(HEAT) - 1)                               # position on the colour ramp
    i = pos.floor().long().clamp(max=len(HEAT) - 2)
    w = (pos - i)[..., None]
    rgb = (HEAT[i] * (1 - w) + HEAT[i + 1] * w).permute(2, 0, 1)       # (3, updates, T)
    rgb = torch.nn.functional.interpolate(rgb[None], size=(height, p.shape[1]), mode="nearest")[0]
    torchvision.utils.save_image(rgb, path)


def report(cfg, step, loss, lr, ips, summary, log_file):
    """One console line and one JSON line: step, loss, lr, images/s, ETA and where the sampler looks."""
    eta = (cfg.steps - step) * cfg.batch_size / ips
    line = (f"step {step}/{cfg.steps} | loss {loss:.4f} | {ips:.0f} img/s | "
            f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
    if summary:
        line += f" | mean t {summary['mean_t']:.0f} | quarters {summary['quarters']}"
    print(line, flush=True)
    log_file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "img_per_s": ips, "sampler": summary}) + "\n")
    log_file.flush()


# ---------------------------------------------------------------------------------------------
# The run: config and resume, signals, the loop
# ---------------------------------------------------------------------------------------------


def start(argv):
    """The config (a resumed run's is its stored one plus the RESUMABLE flags) and the checkpoint, if any.
    Everything is checked here, before anything is written."""
    explicit = parse_args(argv)
    cfg = resolve(explicit)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        if os.path.exists(path):
            raise SystemExit(f"error: {path} exists: pass --resume to continue that run, or choose another --out-dir")
        return cfg, None
    try:
        ckpt = ats.load_checkpoint(path)
    except ats.CheckpointError as e:
        raise SystemExit(f"error: cannot resume: {e}") from None
    stored = config_from_dict(ckpt["config"])
    for name, value in explicit.items():
        if name not in RESUMABLE and value != getattr(stored, name):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} {value} differs from the stored run's {name} = {getattr(stored, name)!r}; "
                             f"on --resume only {', '.join(sorted(RESUMABLE - {'resume', 'out_dir'}))} may change")
    cfg = Config(**{**asdict(stored), **{k: v for k, v in explicit.items() if k in RESUMABLE}, "out_dir": cfg.out_dir,
                    "resume": True})
    if cfg.steps <= ckpt["step"]:
        raise SystemExit(f"error: the run is already at step {ckpt['step']}: pass --steps above that to continue")
    return cfg, ckpt


class Interrupt:
    """Turns SIGINT (Ctrl-C) and SIGTERM (what torchrun forwards) into a flag the loop checks between steps."""

    def __enter__(self):
        self.flag = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, *_):
        self.flag = True

    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def setup(cfg, ckpt, device, rank, world):
    """Data, trainer (restored from ckpt if resuming), the sampler log and config.json."""
    check(cfg, world)
    if rank == 0:  # rank 0 downloads, the others wait and then read
        data = load_data(cfg, device)
    if world > 1:
        dist.barrier()
    if rank > 0:
        data = load_data(cfg, device)
    trainer = build(cfg, device)
    torch.manual_seed(cfg.seed + rank)                    # dropout: a stream per rank
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt)
        except (RuntimeError, KeyError, ValueError) as e:
            raise SystemExit(f"error: the checkpoint does not fit this code ({type(e).__name__}): "
                             "resume it with the version of ats that wrote it") from None
        if rank == 0:
            ats.set_rng_state(ckpt["rng"])
    log = SamplerLog(cfg.heatmap_height, ckpt["extra"].get("sampler_log") if ckpt else None)
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        print(f"{cfg.preset}: {n_params / 1e6:.2f}M parameters, {cfg.sampler} sampler, {len(data)} images"
              f"{' on the device' if isinstance(data, torch.Tensor) else ''}, {world} process(es) on {device}, "
              f"from step {trainer.step}", flush=True)
    indices = batch_indices(len(data), cfg.batch_size // world, rank, world, cfg.seed, trainer.step)
    return trainer, batches(cfg, data, indices, device), log


def augment(cfg, stream, generator):
    """uint8 -> [-1, 1] floats, with random horizontal flips drawn from the trainer's (checkpointed) generator."""
    for x in stream:
        x0 = x.float() / 127.5 - 1                                           # (B, C, H, W) in [-1, 1]
        if cfg.hflip:
            flip = torch.rand(len(x0), 1, 1, 1, generator=generator, device=x0.device) < 0.5
            x0 = torch.where(flip, x0.flip(3), x0)
        yield x0


def train(cfg, ckpt, device, rank, world):
    """The loop: Trainer.run does the steps; between them, log, save, draw, and watch for Ctrl-C and NaN."""
    trainer, stream, log = setup(cfg, ckpt, device, rank, world)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    saved = ckpt["step"] if ckpt else None                                  # the step ckpt.pt holds
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    loss_sum, n, tic, agree_every, stop = torch.zeros((), device=device), 0, time.time(), 1, False
    with Interrupt() as interrupt:
        for loss in trainer.run(augment(cfg, stream, trainer.generator), cfg.steps):
            step, loss_sum, n = trainer.step, loss_sum + loss, n + 1
            if trainer.sampler_stats:
                log.record(step - 1, trainer.sampler_stats, cfg.update_every)
            if step % agree_every == 0:  # ranks agree on a signal every ~2 s, not every step
                stop, agree_every = agree(interrupt.flag, time.time() - tic, n, device, rank, world)
            due = {"log": step % cfg.log_every == 0, "ckpt": step % cfg.ckpt_every == 0 or step == cfg.steps or stop,
                   "grid": step % cfg.sample_every == 0 or step == cfg.steps,
                   "milestone": cfg.milestone_every > 0 and step % cfg.milestone_every == 0}
            if not any(due.values()):
                continue
            mean = mean_over_ranks(loss_sum / n, world)                      # syncs, so the time below is real
            if not math.isfinite(mean):
                raise SystemExit(f"error: the loss became {mean} by step {step}; stopped without saving. "
                                 f"{kept(path, saved)} Resume with a lower --lr, or try --amp none.")
            if due["ckpt"] or due["milestone"]:
                check_weights(trainer, path, saved, world)
            if rank == 0:
                ips = n * cfg.batch_size / (time.time() - tic)
                outputs(cfg, trainer, log, mean, ips, log_file, due)
            saved = step if due["ckpt"] else saved
            if due["log"]:
                loss_sum, n, tic = torch.zeros((), device=device), 0, time.time()
            if stop:
                break
    if stop:
        print(f"interrupted at step {trainer.step}: saved {path}; continue with --resume", flush=True)
        sys.exit(130)


def agree(flag, seconds, n, device, rank, world):
    """(stop, steps until the next agreement): any rank's signal stops all; rank 0 paces the checks to ~2 s."""
    if world == 1:
        return flag, 1
    pace = max(1, round(2.0 * n / max(seconds, 1e-6))) if rank == 0 else 0  # steps in ~2 s, rank 0's clock
    t = torch.tensor([float(flag), float(pace)], device=device)
    dist.all_reduce(t)
    return bool(t[0] > 0), int(t[1])


def mean_over_ranks(x, world):
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x.item()


def kept(path, saved):
    return f"{path} still holds step {saved}." if saved is not None else "No checkpoint was written."


def check_weights(trainer, path, saved, world):
    """Stop before saving weights whose loss is not finite or above MAX_CKPT_LOSS (twice predicting zero noise).
    Every rank checks its own batch, and the worst decides for all."""
    loss = torch.tensor(trainer.check_loss(trainer.batch), device=trainer.device)
    if world > 1:
        dist.all_reduce(loss, op=dist.ReduceOp.MAX)
    loss = loss.item()
    if not (math.isfinite(loss) and loss <= MAX_CKPT_LOSS):
        raise SystemExit(f"error: at step {trainer.step} the weights give L_simple {loss:.3g} (above "
                         f"{MAX_CKPT_LOSS}, worse than predicting zero noise): training diverged; not saved. "
                         f"{kept(path, saved)} Resume with a lower --lr, or try --amp none.")


def outputs(cfg, trainer, log, loss, ips, log_file, due):
    """Rank 0's writing: the log line, the checkpoint (and milestone copy), the grid and the heatmap."""
    step, config, extra = trainer.step, asdict(cfg), {"sampler_log": log.state_dict()}
    if due["log"]:
        report(cfg, step, loss, trainer.sched.get_last_lr()[0], ips, log.summary, log_file)
    if due["ckpt"]:
        ats.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), trainer, config, extra)
    if due["milestone"]:
        ats.save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt"), trainer, config, extra)
    if due["grid"]:
        save_grid(cfg, trainer, os.path.join(cfg.out_dir, f"grid_{step:07d}.png"))
        if log.history:
            save_heatmap(log.history, os.path.join(cfg.out_dir, "sampler.png"), cfg.heatmap_height, cfg.heatmap_range)


def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA GPU is visible: use --device cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def main(argv=None):
    cfg, ckpt = start(argv)
    local_rank, owns_group = int(os.environ.get("LOCAL_RANK", 0)), False
    device = pick_device(cfg.device, local_rank)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # launched by torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        train(cfg, ckpt, device, rank, world)
    except UnreadableImage as e:  # from a DataLoader worker, its message carries the worker's traceback
        raise SystemExit("error: " + str(e)[str(e).rindex("cannot read image"):].strip()) from None
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
