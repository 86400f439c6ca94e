"""Train a DDPM with Adaptive Timestep Sampling (arXiv:2411.09998) on CIFAR-10, a folder of images
or synthetic shapes.

    python train.py                                   # the released ATS CIFAR-10 setup
    python train.py --fid-every 50000                 # ... and FID/KID of the EMA weights
    python train.py --sampler uniform                 # the same run with uniform t
    python train.py --preset tiny                     # offline CPU demo on shapes, a few minutes
    python train.py --resume --out-dir runs/cifar10   # continue a run (Ctrl-C saves first)
    torchrun --nproc_per_node=2 train.py              # DDP: --batch-size stays the global batch

Every knob is a field of Config; --help lists them all. An explicitly given flag beats the preset.
On --resume only the flags in RESUMABLE may change; any other that differs is refused.
"""

import argparse
import fcntl
import gc
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torchvision

import ats
import baselines

# -------------------------------------------------------------------------------------------------
# Config: one dataclass, argparse generated from it, presets as named overrides
# -------------------------------------------------------------------------------------------------

PRESETS = {
    "cifar10": {},  # the defaults below are the released ATS CIFAR-10 setup
    "tiny": dict(dataset="synthetic", image_size=16, out_dir="runs/tiny", steps=2000, batch_size=32,
                 lr=1e-3, warmup=100, ema_decay=0.99, ch=32, ch_mult="1,2,2", num_res=1,
                 attn_res="", dropout=0.0, log_every=100, ckpt_every=500, sample_every=500,
                 sample_steps=25, workers=0),
}


def opt(default, doc, **argparse_kw):
    """A Config field: its default, its one-line --help, and extra argparse keywords."""
    return field(default=default, metadata={"help": doc, **argparse_kw})


@dataclass
class Config:
    """Every setting of a run, with its default and --help line; argparse is made from it."""

    # run
    preset: str = opt("cifar10", "named set of overrides, applied under explicit flags",
                      choices=tuple(PRESETS))
    out_dir: str = opt("runs/cifar10", "folder for ckpt.pt, log.jsonl, grids and sampler.png")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt (only RESUMABLE flags may change)")
    steps: int = opt(800_000, "total training steps")
    seed: int = opt(0, "seed for init, data order, t, noise and the probe")
    device: str = opt("auto", "auto picks cuda when available", choices=("auto", "cuda", "cpu"))
    amp: str = opt("auto", "autocast; auto: bf16/fp16 on CUDA, none on CPU",
                   choices=("auto", "bf16", "fp16", "none"))
    compile: bool = opt(False, "torch.compile the U-Net")
    # data
    dataset: str = opt("cifar10", "training images", choices=("cifar10", "folder", "synthetic"))
    data_dir: str = opt("./data", "where CIFAR-10 lives (or is downloaded to), or the image folder")
    image_size: int = opt(32, "images are resized and centre-cropped to this")
    channels: int = opt(3, "image channels")
    hflip: bool = opt(True, "random horizontal flips")
    synthetic_n: int = opt(10_000, "number of synthetic images")
    workers: int = opt(4, "data-loading worker processes for --dataset folder")
    # diffusion and U-Net
    T: int = opt(1000, "diffusion timesteps")
    schedule: str = opt("quad", "beta schedule", choices=("linear", "quad", "cosine"))
    var_type: str = opt("large", "reverse variance: large = beta_t, small = posterior",
                        choices=("large", "small"))
    prediction: str = opt("eps", "what the U-Net predicts: eps (DDPM), v or x0",
                          choices=("eps", "v", "x0"))
    ch: int = opt(128, "U-Net base channels")
    ch_mult: str = opt("1,2,2,2", "channel multiplier per resolution level, comma-separated")
    num_res: int = opt(2, "residual blocks per level")
    attn_res: str = opt("16", "feature-map sizes with self-attention, comma-separated or empty")
    dropout: float = opt(0.1, "U-Net dropout")
    # optimisation
    batch_size: int = opt(128, "global batch; each of N processes gets batch_size / N")
    lr: float = opt(2e-4, "Adam learning rate")
    warmup: int = opt(5000, "linear learning-rate warmup steps")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    ema_decay: float = opt(0.9999, "EMA decay of the weights used for samples")
    # timestep sampler and loss weighting
    sampler: str = opt("ats", "timestep sampler: ATS or a baseline",
                       choices=("ats", *baselines.SAMPLERS))
    weighting: str = opt("none", "weight on the per-sample L_simple", choices=baselines.WEIGHTINGS)
    update_every: int = opt(40, "f_S: ATS sampler update every this many steps")
    num_selected: int = opt(3, "|S|: timesteps in the ATS reward")
    queue_size: int = opt(20, "Q: queue of T-sweeps for the ATS feature selection")
    policy_lr: float = opt(1e-2, "Adam learning rate of the ATS policy")
    entropy_coef: float = opt(1e-2, "c_ent: entropy coefficient in the ATS reward")
    policy_grad_clip: float = opt(1.0, "gradient-norm clip of the ATS policy")
    probe_batch: int = opt(256, "forwards per chunk in the ATS probe")
    sweep_stride: int = opt(1, "k: the ATS probe sweeps t = 0, k, 2k, ... (1: all T, the paper's)")
    lognormal_mean: float = opt(-1.2, "P_mean of --sampler lognormal (log sigma)")
    lognormal_std: float = opt(1.2, "P_std of --sampler lognormal")
    snr_gamma: float = opt(5.0, "gamma of --weighting min-snr")
    # outputs
    log_every: int = opt(100, "steps between log lines")
    ckpt_every: int = opt(5000, "steps between checkpoints (one is also written at the end)")
    sample_every: int = opt(10_000, "steps between sample grids and sampler.png (and at the end)")
    sample_n: int = opt(64, "images in each grid")
    sample_steps: int = opt(100, "DDIM steps for the grids and FID samples")
    heatmap_height: int = opt(256, "pixel height of the sampler heatmap")
    fid_every: int = opt(0, "steps between FID/KID evaluations of the EMA weights (also at the "
                         "end; needs torch-fidelity); 0: none")
    fid_n: int = opt(10_000, "DDIM samples per FID evaluation, split over the processes")
    fid_ref: str = opt("auto", "FID reference: cifar10-train, a folder of real images, or auto "
                       "(cifar10-train for cifar10, --data-dir for folder)")


# What may change on --resume; every other flag must match the stored run.
RESUMABLE = {"resume", "out_dir", "steps", "device", "amp", "compile", "workers", "lr",
             "policy_lr", "log_every", "ckpt_every", "sample_every", "sample_n", "sample_steps",
             "heatmap_height", "fid_every", "fid_n", "fid_ref"}


def parse_args(argv=None):
    """The flags given explicitly on the command line, as a dict; argparse comes from Config."""
    p = argparse.ArgumentParser(description=__doc__,
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


def ints(text, flag):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(v) for v in text.split(",")) if text.strip() else ()
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers such as 1,2,2, "
                         f"got {text!r}") from None


def configure(argv):
    """The run's config and, on --resume, its checkpoint, checked before anything is written."""
    explicit = parse_args(argv)
    cfg = resolve(explicit)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        if os.path.exists(path):
            raise ValueError(f"{path} exists: pass --resume to continue that run, or choose "
                             "another --out-dir")
        return cfg, None
    try:
        ckpt = ats.load_checkpoint(path)
    except ats.CheckpointError as e:
        raise ValueError(f"cannot resume: {e}") from None
    stored = Config(**ckpt["config"])
    for name, value in explicit.items():
        if name not in RESUMABLE and value != getattr(stored, name):
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the stored run's "
                             f"{getattr(stored, name)!r}; on --resume only "
                             f"{', '.join(sorted(RESUMABLE - {'resume', 'out_dir'}))} may change")
    cfg = Config(**{**asdict(stored), **{k: explicit[k] for k in RESUMABLE & explicit.keys()},
                    "out_dir": cfg.out_dir, "resume": True})
    if cfg.steps <= ckpt["step"]:
        raise ValueError(f"{path} is at step {ckpt['step']}: pass a --steps above it")
    return cfg, ckpt


# -------------------------------------------------------------------------------------------------
# Data: uint8 images decoded once, a resumable batch order, flips
# -------------------------------------------------------------------------------------------------


def synthetic_shapes(n, size, channels, seed):
    """n images of a disc and a square on gradient backgrounds, from `seed` alone:
    uint8 (n, C, size, size)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, 1, 1, generator=g)        # (..., 1, 1): per image
    centres = (torch.arange(size) + 0.5) / size
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    img = rand(n, channels) * (1 - yy) + rand(n, channels) * yy         # (n, C, H, W): gradient
    for square in (False, True):
        cx, cy, r = 0.2 + 0.6 * rand(n, 1), 0.2 + 0.6 * rand(n, 1), 0.1 + 0.2 * rand(n, 1)
        dx, dy = (xx - cx).abs(), (yy - cy).abs()
        inside = torch.maximum(dx, dy) < r if square else dx**2 + dy**2 < r**2
        img = torch.where(inside, rand(n, channels), img)
    return (img * 255).round().to(torch.uint8)


def load_images(cfg):
    """The training set as a uint8 (N, C, H, W) tensor (CIFAR-10, synthetic) or a dataset of
    uint8 (C, H, W) images read by DataLoader workers (a folder)."""
    if cfg.dataset == "synthetic":
        return synthetic_shapes(cfg.synthetic_n, cfg.image_size, cfg.channels, cfg.seed)
    tv = torchvision.transforms
    if cfg.channels != 3 and (cfg.dataset == "cifar10" or cfg.channels != 1):
        raise ValueError("--channels must be 3 for cifar10, and 1 (grey) or 3 (RGB) for a folder")
    if cfg.dataset == "folder":
        if not os.path.isdir(cfg.data_dir):
            raise ValueError(f"--data-dir {cfg.data_dir!r} is not a folder")
        grey = (lambda im: im.convert("L")) if cfg.channels == 1 else (lambda im: im.convert("RGB"))
        data = torchvision.datasets.ImageFolder(cfg.data_dir, tv.Compose([
            grey, tv.Resize(cfg.image_size), tv.CenterCrop(cfg.image_size), tv.PILToTensor()]),
            allow_empty=True)
        if len(data) == 0:
            raise ValueError(f"no images under --data-dir {cfg.data_dir!r}: images go in its "
                             "subfolders (any names)")
        return data
    try:
        data = torchvision.datasets.CIFAR10(cfg.data_dir, train=True, download=True)
    except Exception as e:  # no network, a proxy, a corrupt tarball: all end the same way
        raise ValueError(f"CIFAR-10 is not in {cfg.data_dir!r} and could not be downloaded "
                         f"({type(e).__name__}): put cifar-10-python.tar.gz from https://www.cs."
                         "toronto.edu/~kriz/cifar.html there, or use --dataset synthetic") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)            # (50000, 3, 32, 32) uint8
    return tv.Resize(cfg.image_size, antialias=True)(images) if cfg.image_size != 32 else images


def batches(cfg, data, trainer, rank, world):
    """Endless batches in [-1, 1] on the trainer's device, from trainer.step on. Epoch e is
    DistributedSampler's order e, so a resumed run continues in place; flips are drawn from the
    trainer's (checkpointed) generator."""
    per_rank, device = cfg.batch_size // world, trainer.device
    order = torch.utils.data.DistributedSampler(range(len(data)), world, rank, seed=cfg.seed,
                                                drop_last=True)
    per_epoch = len(order) // per_rank
    if per_epoch == 0:
        raise ValueError(f"{len(data)} images are fewer than one batch of {cfg.batch_size}")
    if isinstance(data, torch.Tensor):
        data = data.to(device)
    epoch, skip = divmod(trainer.step, per_epoch)
    while True:
        order.set_epoch(epoch)
        idx = list(order)
        chunks = [idx[b * per_rank:(b + 1) * per_rank] for b in range(skip, per_epoch)]
        if isinstance(data, torch.Tensor):
            stream = (data[torch.tensor(i, device=device)] for i in chunks)
        else:
            stream = torch.utils.data.DataLoader(
                data, batch_sampler=chunks, num_workers=cfg.workers,
                collate_fn=lambda items: torch.stack([x for x, _ in items]))
        for x in stream:
            x0 = x.to(device).float() / 127.5 - 1                      # (B, C, H, W) in [-1, 1]
            if cfg.hflip:
                flip = torch.rand(len(x0), 1, 1, 1, generator=trainer.generator, device=device)
                x0 = torch.where(flip < 0.5, x0.flip(3), x0)
            yield x0
        epoch, skip = epoch + 1, 0


# -------------------------------------------------------------------------------------------------
# Build: the U-Net, its diffusion, the timestep sampler and the Trainer
# -------------------------------------------------------------------------------------------------


def build(cfg, device, sampler_cls=ats.AdaptiveTimestepSampler, **trainer_kw):
    """U-Net, diffusion, timestep sampler and Trainer (trainer_kw: e.g. channels_last). The same
    seed gives the same weights. A setting the constructors refuse raises ValueError."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # fp32 matmuls (the probe's attention) use TF32, as cuDNN convs do
        torch.backends.cuda.matmul.allow_tf32 = True
    model = ats.UNet(in_ch=cfg.channels, ch=cfg.ch, ch_mult=ints(cfg.ch_mult, "--ch-mult"),
                     num_res=cfg.num_res, attn_res=ints(cfg.attn_res, "--attn-res"),
                     dropout=cfg.dropout, image_size=cfg.image_size).to(device)
    diffusion = ats.GaussianDiffusion(ats.make_betas(cfg.schedule, cfg.T), var_type=cfg.var_type,
                                      prediction=cfg.prediction).to(device)
    if cfg.sampler == "ats":
        sampler = sampler_cls(
            cfg.T, lambda x0, t, noise: diffusion.vlb_terms(model, x0, t, noise), cfg.channels,
            model=model, update_every=cfg.update_every, num_selected=cfg.num_selected,
            queue_size=cfg.queue_size, policy_lr=cfg.policy_lr, entropy_coef=cfg.entropy_coef,
            policy_grad_clip=cfg.policy_grad_clip, probe_batch=cfg.probe_batch,
            sweep_stride=cfg.sweep_stride, seed=cfg.seed, device=device)
    else:
        sampler = baselines.make_sampler(cfg.sampler, cfg.T, diffusion.abar.cpu(),
                                         cfg.lognormal_mean, cfg.lognormal_std)
    if cfg.weighting != "none" and cfg.prediction != "eps":
        raise ValueError(f"--weighting {cfg.weighting} is written for eps-prediction")
    weights = baselines.loss_weights(cfg.weighting, diffusion.abar.cpu(), snr_gamma=cfg.snr_gamma)
    return ats.Trainer(model, diffusion, sampler, lr=cfg.lr, warmup=cfg.warmup,
                       grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, amp=cfg.amp,
                       compile=cfg.compile, loss_weights=weights, seed=cfg.seed, **trainer_kw)


# -------------------------------------------------------------------------------------------------
# What a run writes besides checkpoints: log lines, grids, the policy heatmap
# -------------------------------------------------------------------------------------------------


class SamplerLog:
    """Where the ATS policy put its mass: the last update's summary, and a thinned history of
    pi(t) for the heatmap (every `every`-th update, halved when it outgrows `rows`)."""

    def __init__(self, rows, state=None):
        self.rows, self.history, self.every, self.summary = rows, [], 1, {}
        if state:
            self.history, self.every, self.summary = (state[k] for k in ("history", "every",
                                                                          "summary"))

    def record(self, step, stats, update_every):
        p = stats["p"]
        self.summary = {"mean_t": float((p * torch.arange(len(p))).sum()), "S": stats["S"],
                        "quarters": [round(float(q.sum()), 3) for q in p.chunk(4)],
                        **{k: stats[k] for k in ("reward", "reward_rms", "kl_step", "kl_uniform")}}
        if step // update_every % self.every == 0:
            self.history.append(p)
            if len(self.history) > self.rows:
                self.history, self.every = self.history[::2], 2 * self.every

    def state_dict(self):
        return {"history": self.history, "every": self.every, "summary": self.summary}


HEAT = torch.tensor([[0.0, 0.0, 0.2], [0.1, 0.3, 0.8], [0.9, 0.9, 0.9], [0.95, 0.5, 0.1],
                     [1.0, 1.0, 0.3]])                       # colour ramp: dark, uniform, bright


def save_heatmap(history, path, height, spread=10.0):
    """pi(t) over training: rows are sampler updates (first at the top), columns t; the colour
    is log(pi(t) T) on [-log spread, log spread], uniform mid-ramp."""
    p = torch.stack(history).float()                                    # (updates, T)
    pos = (((p * p.shape[1]).log() / math.log(spread) + 1) / 2).clamp(0, 1) * (len(HEAT) - 1)
    i = pos.floor().long().clamp(max=len(HEAT) - 2)
    w = (pos - i)[..., None]
    rgb = (HEAT[i] * (1 - w) + HEAT[i + 1] * w).permute(2, 0, 1)        # (3, updates, T)
    rgb = torch.nn.functional.interpolate(rgb[None], size=(height, p.shape[1]), mode="nearest")
    torchvision.utils.save_image(rgb[0], path)


@torch.no_grad()
def save_grid(cfg, trainer, path):
    """EMA samples by DDIM, from the same noise every time so that grids compare across steps."""
    shape = (cfg.sample_n, cfg.channels, cfg.image_size, cfg.image_size)
    with ats.autocast(trainer.device, cfg.amp):
        x = ats.ddim_sample(trainer.diffusion, trainer.ema, shape, steps=cfg.sample_steps,
                            generator=torch.Generator().manual_seed(cfg.seed))
    torchvision.utils.save_image((x.float() + 1) / 2, path, nrow=math.ceil(math.sqrt(cfg.sample_n)))


def log(line, record, log_file):
    """One console line and one JSON line of log.jsonl."""
    print(line, flush=True)
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def cut_log(path, step):
    """Keep log.jsonl's records up to the checkpoint's step: a run killed after its last
    checkpoint logged steps that the resumed run logs again."""
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def claim(out_dir):
    """Create and lock the out-dir: one run at a time; the lock goes with the process."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"{out_dir} is in use by another training run: wait for it to end, or "
                         "choose another --out-dir") from None
    return lock


# -------------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------------


def main(argv=None):
    """Configure, set up the processes, train to --steps or to a signal; exit 0, or 130."""
    try:
        # Config: flags over the preset; on --resume, the stored run plus the RESUMABLE flags
        cfg, ckpt = configure(argv)
        # Processes: one, or one per GPU under torchrun (NCCL on CUDA, gloo on CPU)
        device = ats.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        stopped = train(cfg, ckpt, device, *ats.rank_and_size())
    except (ValueError, ats.CheckpointError, FloatingPointError) as e:  # a setting, the data, a
        raise SystemExit(f"error: {e}") from None                       # checkpoint, divergence
    except torch.OutOfMemoryError:
        raise SystemExit("error: out of memory: lower --batch-size, --ch or --image-size (or "
                         "--probe-batch)") from None
    finally:
        if dist.is_initialized():   # the Trainer's reference cycle holds the group: collect it
            gc.collect()            # first, or a gloo thread can abort the finished run
            dist.destroy_process_group()
    if stopped:
        raise SystemExit(130)


def train(cfg, ckpt, device, rank, world):
    """Build, restore and train; True if a signal stopped the run (after saving)."""
    if cfg.batch_size % world or min(cfg.batch_size, cfg.steps, cfg.log_every, cfg.ckpt_every,
                                     cfg.sample_every) < 1:
        raise ValueError(f"--batch-size must be a multiple of the {world} process(es), and "
                         "--steps and the --*-every intervals at least 1")
    # Model, diffusion, sampler and trainer; the data; FID's scorer: each checked before a write
    trainer = build(cfg, device)
    ats.ddim_timesteps(cfg.T, cfg.sample_steps)
    fid = make_fid(cfg, device) if cfg.fid_every and rank == 0 else None
    data = load_images(cfg)
    # The out-dir, locked; on --resume the trainer, the random streams and the log continue
    lock, path = claim(cfg.out_dir) if rank == 0 else None, os.path.join(cfg.out_dir, "ckpt.pt")
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        if rank == 0:
            cut_log(os.path.join(cfg.out_dir, "log.jsonl"), ckpt["step"])
    torch.manual_seed(cfg.seed + rank)                           # dropout: a stream per rank
    if ckpt is not None and rank == 0:
        ats.set_rng_state(ckpt["rng"])
    sampler_log = SamplerLog(cfg.heatmap_height, ckpt["extra"]["sampler_log"] if ckpt else None)
    if rank == 0:
        print(f"{cfg.preset}: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
              f"parameters, {cfg.sampler} sampler, {len(data)} images, {world} process(es) on "
              f"{device}, from step {trainer.step}", flush=True)
    stop = []                                  # Ctrl-C, SIGTERM, SIGHUP: finish the step, save
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    loss_sum, n, tic = 0.0, 0, time.time()
    try:
        for loss in trainer.run(batches(cfg, data, trainer, rank, world), cfg.steps):
            # The step is taken; between steps: log, checkpoint, grid and heatmap, FID
            step, loss_sum, n = trainer.step, loss_sum + loss, n + 1
            if trainer.sampler_stats:
                sampler_log.record(step - 1, trainer.sampler_stats, cfg.update_every)
            stopping = stop != [] if world == 1 else (ats.all_reduce(                # any rank's
                torch.tensor(float(stop != []), device=device)).item() > 0)          # signal
            due = {k: step % getattr(cfg, f"{k}_every") == 0 for k in ("log", "ckpt", "sample")}
            fid_due = cfg.fid_every and (step % cfg.fid_every == 0 or step == cfg.steps)
            if not (any(due.values()) or fid_due or stopping or step == cfg.steps):
                continue
            mean = (ats.all_reduce(loss_sum / n) / world).item()       # syncs: the time is real
            if not math.isfinite(mean):
                raise ValueError(f"the loss became {mean} by step {step}; stopped without saving, "
                                 f"so {path} keeps the last good step. Resume with a lower --lr, "
                                 "or try --amp none")
            if rank == 0 and due["log"]:
                ips, summary = n * cfg.batch_size / (time.time() - tic), sampler_log.summary
                eta = round((cfg.steps - step) * cfg.batch_size / ips)
                log(f"step {step}/{cfg.steps} | loss {mean:.4f} | {ips:.0f} img/s | ETA "
                    f"{eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}" + (
                        f" | mean t {summary['mean_t']:.0f} | quarters {summary['quarters']} | "
                        f"update KL {summary['kl_step']:.3f}" if summary else ""),
                    {"step": step, "loss": mean, "lr": trainer.sched.get_last_lr()[0],
                     "img_per_s": ips, "sampler": summary}, log_file)
                loss_sum, n, tic = 0.0, 0, time.time()
            if rank == 0 and (due["ckpt"] or stopping or step == cfg.steps):
                ats.save_checkpoint(path, trainer, asdict(cfg),
                                    extra={"sampler_log": sampler_log.state_dict()})
            if rank == 0 and (due["sample"] or step == cfg.steps):
                save_grid(cfg, trainer, os.path.join(cfg.out_dir, f"grid_{step:07d}.png"))
                if sampler_log.history:
                    save_heatmap(sampler_log.history, os.path.join(cfg.out_dir, "sampler.png"),
                                 cfg.heatmap_height)
            if fid_due and not stopping:
                fid_score(cfg, trainer, fid, rank, world, log_file)
            if stopping:
                if rank == 0:
                    print(f"interrupted at step {step}: saved {path}; continue with --resume",
                          flush=True)
                return True
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for f in (log_file, lock):
            if f is not None:
                f.close()
    return False


# -------------------------------------------------------------------------------------------------
# FID over training: sample.py's scorer, on DDIM samples of the EMA weights split over the ranks
# -------------------------------------------------------------------------------------------------


def make_fid(cfg, device):
    """sample.py's FID scorer for --fid-ref, checked now (package, weights, reference)."""
    import sample
    ref = cfg.fid_ref if cfg.fid_ref != "auto" else {"cifar10": "cifar10-train",
                                                      "folder": cfg.data_dir}.get(cfg.dataset)
    if ref is None:
        raise ValueError(f"--fid-every on --dataset {cfg.dataset} needs --fid-ref, a folder of "
                         "real images")
    return sample.FID(ref, data_dir=cfg.data_dir, device=device)


def fid_score(cfg, trainer, fid, rank, world, log_file):
    """FID of cfg.fid_n EMA samples, image i from the noise of (seed, i): made by every rank,
    scored and logged by rank 0."""
    import sample
    per = math.ceil(cfg.fid_n / world)
    images = sample.make_images(trainer.ema, trainer.diffusion, range(rank * per, min(
        (rank + 1) * per, cfg.fid_n)), cfg.seed, cfg.sample_steps, cfg.amp, trainer.device)
    images = ((images + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)   # (n, C, H, W)
    if world > 1:
        images = torch.cat([images, images.new_zeros((per - len(images), *images.shape[1:]))])
        gathered = [torch.empty_like(images) for _ in range(world)]
        dist.all_gather(gathered, images.to(trainer.device))
        images = torch.cat(gathered)[:cfg.fid_n]
    if rank == 0:
        r = fid(images.cpu())
        log(f"step {trainer.step}/{cfg.steps} | FID {r['fid']:.3f} | KID {r['kid']:.5f} | "
            f"{r['n']} EMA samples against {r['reference']}",
            {"step": trainer.step, "fid": r["fid"], "kid": r["kid"], "fid_n": r["n"]}, log_file)


if __name__ == "__main__":
    main()
