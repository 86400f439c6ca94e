"""Train a DDPM with Adaptive Timestep Sampling (arXiv:2411.09998) on CIFAR-10, an image folder or synthetic shapes.

    python train.py                                   # the released ATS CIFAR-10 setup (quad schedule, ATS)
    python train.py --sampler uniform                 # the same run with uniform t, for a fair comparison
    python train.py --preset tiny                     # offline CPU demo on synthetic shapes, a few minutes
    python train.py --resume --out-dir runs/cifar10   # continue a run (Ctrl-C saves a checkpoint first)
    torchrun --nproc_per_node=2 train.py              # DDP: --batch-size stays the global batch

Every knob is a field of Config; --help lists them all. An explicitly given flag beats the preset.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as tvt
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

import ats

# ---------------------------------------------------------------------------------------------
# Config: one dataclass, argparse generated from it, presets as named overrides
# ---------------------------------------------------------------------------------------------

PRESETS = {
    "cifar10": {},  # the defaults below are the released ATS CIFAR-10 setup (ALGORITHM.md)
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
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt; explicit flags override its stored config")
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
    workers: int = opt(4, "data-loading worker processes")
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
    # timestep sampler (ATS Eq. 11-14)
    sampler: str = opt("ats", "timestep sampler", choices=("uniform", "ats"))
    ats_every: int = opt(40, "f_S: sampler update every this many steps")
    ats_k: int = opt(3, "|S|: timesteps in the reward")
    ats_queue: int = opt(20, "Q: queue of sweeps for feature selection")
    ats_lr: float = opt(1e-2, "policy Adam learning rate")
    ats_entropy: float = opt(1e-2, "entropy bonus coefficient")
    ats_grad_clip: float = opt(1.0, "policy gradient-norm clip")
    ats_baseline: bool = opt(False, "subtract the batch-mean reward")
    ats_standardize: bool = opt(False, "divide the centred reward by its batch std")
    ats_mix: float = opt(0.0, "uniform-mixture floor on the policy")
    ats_ab_min: float = opt(0.0, "lower clamp on the Beta parameters a, b; 0: no floor")
    ats_ab_max: float = opt(0.0, "upper clamp on the Beta parameters a, b; 0: no cap")
    probe_batch: int = opt(256, "forwards per chunk in the sampler's probe")
    # outputs
    log_every: int = opt(100, "steps between log lines")
    ckpt_every: int = opt(5000, "steps between checkpoints (one is also written at the end)")
    milestone_every: int = opt(0, "steps between kept copies ckpt_<step>.pt; 0: none")
    sample_every: int = opt(10_000, "steps between EMA sample grids and heatmaps (also at the end)")
    sample_n: int = opt(64, "images in each grid")
    sample_steps: int = opt(100, "DDIM steps for the grids")
    heatmap_height: int = opt(256, "pixel height of the sampler heatmap")
    heatmap_range: float = opt(10.0, "heatmap colours span pi(t) from uniform/R to uniform*R, log scale")


def parse_args(argv=None):
    """The flags given explicitly on the command line, as a dict. argparse is generated from Config."""
    epilog = "presets: " + "; ".join(f"{name} = " + (", ".join(f"{k}={v}" for k, v in over.items()) or "the defaults")
                                     for name, over in PRESETS.items())
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


def ints(s):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise SystemExit(f"error: expected comma-separated integers, got {s!r}") from None


def check(cfg, world):
    """Refuse impossible settings with one line each, before anything is built."""
    levels = len(ints(cfg.ch_mult))
    problems = [
        (cfg.batch_size % world != 0, f"--batch-size {cfg.batch_size} does not divide over {world} processes"),
        (levels == 0 or cfg.image_size % 2 ** (levels - 1) != 0,
         f"--image-size {cfg.image_size} must be divisible by 2^{levels - 1} for --ch-mult {cfg.ch_mult}"),
        (cfg.dataset == "cifar10" and cfg.channels != 3, "cifar10 is RGB: use --channels 3"),
        (cfg.dataset == "folder" and cfg.channels not in (1, 3), "--dataset folder reads grey (1) or RGB (3) images"),
        (min(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.sample_every, cfg.sample_n) < 1,
         "--steps, --sample-n and the --*-every intervals must be at least 1"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Data: every dataset yields uint8 (C, H, W) tensors; the loop maps them to [-1, 1]
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
        with Image.open(self.files[i]) as im:
            return (self.transform(im.convert(self.mode)),)


def make_dataset(cfg):
    if cfg.dataset == "synthetic":
        return TensorDataset(synthetic_shapes(cfg.synthetic_n, cfg.image_size, cfg.channels, cfg.seed))
    if cfg.dataset == "folder":
        data = ImageFiles(cfg.data_dir, cfg.image_size, cfg.channels)
        if len(data) == 0:
            raise SystemExit(f"error: no images found under --data-dir {cfg.data_dir!r}")
        return data
    transform = tvt.Compose([tvt.Resize(cfg.image_size), tvt.CenterCrop(cfg.image_size), tvt.PILToTensor()])
    try:
        return torchvision.datasets.CIFAR10(cfg.data_dir, train=True, download=True, transform=transform)
    except Exception as e:  # no network, a proxy, a full disk: all end the same way
        raise SystemExit(f"error: CIFAR-10 is not in {cfg.data_dir!r} and could not be downloaded "
                         f"({type(e).__name__}). Put cifar-10-python.tar.gz from "
                         "https://www.cs.toronto.edu/~kriz/cifar.html into that folder (or point --data-dir at it), "
                         "or train offline with --dataset synthetic or --dataset folder.") from None


def batches(cfg, dataset, per_rank, rank, world, start_step):
    """Endless per-rank batches. Epoch e is DistributedSampler's order e, so a resumed run picks up in place."""
    order = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(order) // per_rank
    if per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} images are fewer than one batch of {cfg.batch_size}")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order.set_epoch(epoch)
        loader = DataLoader(Subset(dataset, list(order)[skip * per_rank:]), batch_size=per_rank, drop_last=True,
                            num_workers=cfg.workers, generator=torch.Generator())  # leaves the global RNG alone
        yield from (b[0] for b in loader)
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# Model, sampler and trainer
# ---------------------------------------------------------------------------------------------


def build_model(cfg, device):
    """The U-Net eps_theta and the diffusion process that cfg describes."""
    model = ats.UNet(in_ch=cfg.channels, ch=cfg.ch, ch_mult=ints(cfg.ch_mult), num_res=cfg.num_res,
                     attn_res=ints(cfg.attn_res), dropout=cfg.dropout, image_size=cfg.image_size)
    diffusion = ats.GaussianDiffusion(T=cfg.T, schedule=cfg.schedule, var_type=cfg.var_type)
    return model.to(device), diffusion.to(device)


def build(cfg, device):
    """U-Net, diffusion, timestep sampler and Trainer. The same seed gives the same initial weights."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # fp32 matmuls (the probe's attention) use TF32, as cuDNN convolutions do already
        torch.backends.cuda.matmul.allow_tf32 = True
    model, diffusion = build_model(cfg, device)
    if cfg.sampler == "uniform":
        sampler = ats.UniformSampler(cfg.T)
    else:
        ab_range = (cfg.ats_ab_min, cfg.ats_ab_max or math.inf) if cfg.ats_ab_min or cfg.ats_ab_max else None
        sampler = ats.AdaptiveTimestepSampler(
            cfg.T, lambda x0, t, n: diffusion.vlb_terms(model, x0, t, n), cfg.channels, model=model,
            update_every=cfg.ats_every, k=cfg.ats_k, queue_size=cfg.ats_queue, lr=cfg.ats_lr,
            entropy_coef=cfg.ats_entropy, grad_clip=cfg.ats_grad_clip, baseline=cfg.ats_baseline,
            standardize=cfg.ats_standardize, mix=cfg.ats_mix, ab_range=ab_range, probe_batch=cfg.probe_batch,
            seed=cfg.seed, device=device)
    return ats.Trainer(model, diffusion, sampler, lr=cfg.lr, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                       ema_decay=cfg.ema_decay, amp=cfg.amp, compile=cfg.compile)


def autocast(device, amp):
    dtype = ats.autocast_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------------
# Outputs: sample grids and the sampler heatmap, drawn with torchvision alone
# ---------------------------------------------------------------------------------------------

HEAT = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.0, 0.55], [1.0, 0.45, 0.0], [1.0, 1.0, 0.7]])  # black..pale yellow


@torch.no_grad()
def save_grid(cfg, trainer, path):
    """EMA samples by DDIM, from the same noise every time so that grids compare across steps."""
    shape = (cfg.sample_n, cfg.channels, cfg.image_size, cfg.image_size)
    with autocast(trainer.device, cfg.amp):
        x = trainer.diffusion.ddim_sample(trainer.ema.module.eval(), shape, steps=cfg.sample_steps,
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


# ---------------------------------------------------------------------------------------------
# The run: processes, resume, the loop
# ---------------------------------------------------------------------------------------------


def pick_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA GPU is visible: use --device cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


def start(argv):
    """Resolve the config (a resumed run starts from its stored one) and the checkpoint to resume, if any."""
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
    return config_from_dict({**ckpt["config"], **explicit, "out_dir": cfg.out_dir}), ckpt


def mean_loss(meter, world):
    """Mean loss over the window, all ranks together (the only all-reduce the logging does)."""
    total = torch.stack([meter["loss"], torch.tensor(float(meter["n"]), device=meter["loss"].device)])
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def report(cfg, trainer, meter, loss, log_file):
    """One console line and one JSON line: step, loss, lr, images/s, ETA and where the sampler looks."""
    step, ips = trainer.step_count, meter["n"] * cfg.batch_size / meter["time"]
    eta = (cfg.steps - step) * meter["time"] / meter["n"]
    summary = trainer.sampler.summary()
    line = (f"step {step}/{cfg.steps} | loss {loss:.4f} | {ips:.0f} img/s | "
            f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
    if summary:
        line += f" | mean t {summary['mean_t']:.0f} | quarters {summary['quarters']}"
    print(line, flush=True)
    record = {"step": step, "loss": loss, "lr": trainer.sched.get_last_lr()[0], "img_per_s": ips, "sampler": summary}
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


@contextlib.contextmanager
def ctrl_c_flag():
    """Turn Ctrl-C into a flag that the loop checks between steps, so a saved state is never half-updated."""
    flag = []
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def any_rank(flag, device, world):
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if world == 1:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def setup(cfg, ckpt, device, rank, world):
    """Data, trainer (restored from ckpt if resuming) and config.json; returns the trainer and the batches."""
    check(cfg, world)
    if rank == 0:  # rank 0 downloads, the others wait and then read
        data = make_dataset(cfg)
    if world > 1:
        dist.barrier()
    if rank > 0:
        data = make_dataset(cfg)
    trainer = build(cfg, device)
    torch.manual_seed(cfg.seed + rank)                    # dropout: a stream per rank
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt)
        except (RuntimeError, KeyError, ValueError) as e:
            raise SystemExit(f"error: the checkpoint does not fit this config ({type(e).__name__}): "
                             "resume without changing model flags") from None
        if rank == 0:
            ats.set_rng_state(ckpt["rng"])
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        print(f"{cfg.preset}: {n_params / 1e6:.2f}M parameters, {cfg.sampler} sampler, {len(data)} images, "
              f"{world} process(es) on {device}, from step {trainer.step_count}", flush=True)
    return trainer, batches(cfg, data, cfg.batch_size // world, rank, world, trainer.step_count)


def train(cfg, ckpt, device, rank, world):
    """The loop: a step per batch; at log/checkpoint/grid steps, check the loss and let rank 0 write."""
    trainer, stream = setup(cfg, ckpt, device, rank, world)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    gen = torch.Generator(device)
    meter = {"loss": torch.zeros((), device=device), "n": 0, "time": 0.0}
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    with ctrl_c_flag() as interrupted, log_file or contextlib.nullcontext():
        tic, stop = time.time(), False
        while trainer.step_count < cfg.steps and not stop:
            gen.manual_seed(hash((cfg.seed, rank, trainer.step_count)))  # t, noise, flips: exact on resume
            x0 = next(stream).to(device, non_blocking=True).float() / 127.5 - 1   # (B, C, H, W) in [-1, 1]
            if cfg.hflip:
                x0 = torch.where(torch.rand(len(x0), 1, 1, 1, generator=gen, device=device) < 0.5, x0.flip(3), x0)
            meter["loss"] += trainer.step(x0, generator=gen)
            meter["n"] += 1
            step = trainer.step_count
            due = {"log": step % cfg.log_every == 0, "ckpt": step % cfg.ckpt_every == 0 or step == cfg.steps,
                   "grid": step % cfg.sample_every == 0 or step == cfg.steps,
                   "milestone": cfg.milestone_every > 0 and step % cfg.milestone_every == 0}
            if world == 1 or any(due.values()):  # under torchrun, agree on Ctrl-C only where ranks sync anyway
                stop = any_rank(interrupted, device, world)
                due["ckpt"] = due["ckpt"] or stop
            if not any(due.values()):
                continue
            loss = mean_loss(meter, world)                      # syncs, so the time below is real
            meter["time"] += time.time() - tic
            if not math.isfinite(loss):
                raise SystemExit(f"error: the loss became {loss} by step {step}; stopped without saving, so "
                                 f"{path} still holds the last good state. Try a lower --lr or --amp none.")
            if rank == 0:
                outputs(cfg, trainer, meter, loss, log_file, due)
            if due["log"]:
                meter.update(loss=torch.zeros((), device=device), n=0, time=0.0)
            tic = time.time()
    if stop:
        raise SystemExit(f"interrupted at step {trainer.step_count}: saved {path}; continue with --resume")


def outputs(cfg, trainer, meter, loss, log_file, due):
    """Rank 0's writing: the log line, the checkpoint (and milestone copy), the grid and the heatmap."""
    step, config = trainer.step_count, asdict(cfg)
    if due["log"]:
        report(cfg, trainer, meter, loss, log_file)
    if due["ckpt"]:
        ats.save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), trainer, config)
    if due["milestone"]:
        ats.save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt"), trainer, config)
    if due["grid"]:
        save_grid(cfg, trainer, os.path.join(cfg.out_dir, f"grid_{step:07d}.png"))
        if getattr(trainer.sampler, "history", None):
            save_heatmap(trainer.sampler.history, os.path.join(cfg.out_dir, "sampler.png"), cfg.heatmap_height,
                         cfg.heatmap_range)


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
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
