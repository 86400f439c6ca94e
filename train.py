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

import signal
import sys


def interrupted_while_starting(signum, frame):
    """A signal before the first step: one line and exit 130, nothing written."""
    try:                                          # after SIGHUP the terminal may be gone
        print(f"interrupted while starting ({signal.Signals(signum).name}), before the first "
              "step: nothing was saved or changed", file=sys.stderr)
    except OSError:
        pass
    raise SystemExit(130)


if __name__ == "__main__":  # a signal while torch loads: one line, not an import traceback
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupted_while_starting)

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

import ats
import heuristics
from data import UnreadableImage, augment, batch_indices, batches, load_data
from pictures import SamplerLog, fid_samples, plot_metrics, save_grid, save_heatmap
from safety import (
    Interrupt,
    agree,
    check_weights,
    claim_out_dir,
    file_identity,
    kept,
    memory_for,
    peer_lost,
    save,
)

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
    out_dir: str = opt("runs/cifar10", "folder for ckpt.pt, grids, log.jsonl, plots, config.json")
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
    on_device: str = opt("auto", "keep the decoded dataset in device memory; auto: if it takes "
                         "<= 25%%", choices=("auto", "yes", "no"))
    workers: int = opt(4, "data-loading worker processes (when the data is not on the device)")
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
    sampler: str = opt("ats", "timestep sampler: ATS or a heuristic",
                       choices=("ats", *heuristics.SAMPLERS))
    weighting: str = opt("none", "weight on the per-sample L_simple", choices=heuristics.WEIGHTINGS)
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
    milestone_every: int = opt(0, "steps between kept copies ckpt_<step>.pt; 0: none")
    sample_every: int = opt(10_000, "steps between EMA sample grids and plots (also at the end)")
    sample_n: int = opt(64, "images in each grid")
    sample_steps: int = opt(100, "DDIM steps for the grids and FID samples")
    heatmap_height: int = opt(256, "pixel height of the sampler heatmap")
    heatmap_range: float = opt(10.0, "heatmap colours span pi(t) from uniform/R to uniform*R")
    fid_every: int = opt(0, "steps between FID/KID evaluations of the EMA weights (also at the "
                         "end; needs torch-fidelity); 0: none")
    fid_n: int = opt(10_000, "DDIM samples per FID evaluation, split over the processes")
    fid_ref: str = opt("auto", "FID reference: cifar10-train, a folder of real images, or auto "
                       "(cifar10-train for cifar10, --data-dir for folder)")
    fid_batch: int = opt(500, "images per sampling batch in an FID evaluation")


# What may change on --resume; every other flag must match the stored run.
RESUMABLE = {"resume", "out_dir", "steps", "device", "amp", "compile", "workers", "on_device", "lr",
             "policy_lr", "log_every", "ckpt_every", "milestone_every", "sample_every", "sample_n",
             "sample_steps", "heatmap_height", "heatmap_range", "fid_every", "fid_n", "fid_ref",
             "fid_batch"}


def parse_args(argv=None):
    """The flags given explicitly on the command line, as a dict; argparse comes from Config."""
    presets = "; ".join(f"{name} = " + (", ".join(f"{k}={v}" for k, v in over.items())
                                         or "the defaults") for name, over in PRESETS.items())
    resumable = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(RESUMABLE))
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {presets}. On --resume only these may change: {resumable}.")
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
    """The Config that a command line gives (before any --resume)."""
    return resolve(parse_args(argv))


def config_from_dict(d):
    """Config from a stored dict (config.json or a checkpoint); unknown keys are ignored."""
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


def ints(text, flag):
    """'1,2,2' -> (1, 2, 2); '' -> (). An empty or non-integer item is refused."""
    if not text.strip():
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: {flag} expects comma-separated integers such as 1,2,2, "
                         f"got {text!r}") from None


def fid_reference(cfg):
    """What --fid-ref auto means for this dataset; None if there is no natural reference."""
    if cfg.fid_ref != "auto":
        return cfg.fid_ref
    return {"cifar10": "cifar10-train", "folder": cfg.data_dir}.get(cfg.dataset)


def check(cfg, world):
    """Refuse impossible run settings with one line each, before anything is built or written.
    The model, diffusion, sampler and trainer check their own arguments when build() makes them."""
    ints(cfg.ch_mult, "--ch-mult")
    ints(cfg.attn_res, "--attn-res")
    problems = [
        (cfg.batch_size < 1 or cfg.batch_size % world,
         f"--batch-size {cfg.batch_size} must be a positive multiple of the {world} process(es)"),
        (min(cfg.steps, cfg.log_every, cfg.ckpt_every, cfg.sample_every, cfg.sample_n,
             cfg.heatmap_height, cfg.synthetic_n, cfg.fid_batch) < 1,
         "--steps, --synthetic-n, --sample-n, --heatmap-height, --fid-batch and the --*-every "
         "intervals must be at least 1"),
        (min(cfg.workers, cfg.milestone_every, cfg.fid_every) < 0,
         "--workers, --milestone-every and --fid-every must be >= 0"),
        (cfg.fid_n < 4, "--fid-n must be at least 4"),
        (not 0 <= cfg.seed < 2**62, "--seed must be in [0, 2^62)"),
        (cfg.sample_n > 1024, "--sample-n is the grid's size, at most 1024: sample.py makes more"),
        (cfg.heatmap_height > 4096, "--heatmap-height must be at most 4096 (pixels)"),
        (not (math.isfinite(cfg.heatmap_range) and cfg.heatmap_range > 1),
         "--heatmap-range must be above 1"),
        (cfg.dataset == "cifar10" and cfg.channels != 3, "cifar10 is RGB: use --channels 3"),
        (cfg.dataset == "folder" and cfg.channels not in (1, 3),
         "--dataset folder reads grey (1) or RGB (3) images"),
        (cfg.dataset == "folder" and not os.path.isdir(cfg.data_dir),
         f"--data-dir {cfg.data_dir!r} does not exist or is not a folder"),
        (not cfg.out_dir.strip(), "--out-dir is empty: name a folder"),
        (cfg.fid_every > 0 and fid_reference(cfg) is None,
         f"--fid-every on --dataset {cfg.dataset} needs --fid-ref, a folder of real images"),
        (cfg.weighting != "none" and cfg.prediction != "eps",
         f"--weighting {cfg.weighting} is written for eps-prediction: use --prediction eps, or "
         "--weighting none"),
        (not (math.isfinite(cfg.snr_gamma) and cfg.snr_gamma > 0),
         f"--snr-gamma must be positive, got {cfg.snr_gamma}"),
        (not (math.isfinite(cfg.lognormal_std) and cfg.lognormal_std > 0
              and math.isfinite(cfg.lognormal_mean)),
         f"--lognormal-std must be positive and --lognormal-mean finite, got {cfg.lognormal_std} "
         f"and {cfg.lognormal_mean}"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


# Flags that only one sampler or weighting reads: flag -> (the setting, the value that reads it).
ONLY_WITH = {"snr_gamma": ("weighting", "min-snr"), "lognormal_mean": ("sampler", "lognormal"),
             "lognormal_std": ("sampler", "lognormal"),
             **dict.fromkeys(("update_every", "num_selected", "queue_size", "policy_lr",
                              "entropy_coef", "policy_grad_clip", "probe_batch", "sweep_stride"),
                             ("sampler", "ats"))}


def warn_unused(cfg, explicit):
    """One warning line (from rank 0) for each flag given explicitly that this run never reads."""
    if int(os.environ.get("RANK", 0)) > 0:
        return
    for name in explicit:
        setting, value = ONLY_WITH.get(name, (None, None))
        if setting and getattr(cfg, setting) != value:
            print(f"warning: --{name.replace('_', '-')} does nothing in this run: only "
                  f"--{setting} {value} uses it", file=sys.stderr, flush=True)


def configure(argv):
    """The config (a resumed run's is its stored one plus the RESUMABLE flags) and the checkpoint,
    if any, with the checkpoint file's identity. Checked here, before anything is written."""
    explicit = parse_args(argv)
    cfg = resolve(explicit)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        if os.path.exists(path):
            raise SystemExit(f"error: {path} exists: pass --resume to continue that run, or choose "
                             "another --out-dir")
        warn_unused(cfg, explicit)
        return cfg, None, None
    try:
        identity = file_identity(path)
        ckpt = ats.load_checkpoint(path)
    except ats.CheckpointError as e:
        raise SystemExit(f"error: cannot resume: {e}") from None
    stored = config_from_dict(ckpt["config"])
    for name, value in explicit.items():
        if name not in RESUMABLE and value != getattr(stored, name):
            flag = "--" + name.replace("_", "-")
            may = ", ".join(sorted(RESUMABLE - {"resume", "out_dir"}))
            raise SystemExit(f"error: {flag} {value} differs from the stored run's {name} = "
                             f"{getattr(stored, name)!r}; on --resume only {may} may change")
    cfg = Config(**{**asdict(stored), **{k: v for k, v in explicit.items() if k in RESUMABLE},
                    "out_dir": cfg.out_dir, "resume": True})
    if cfg.steps <= ckpt["step"]:
        raise SystemExit(f"error: the run is already at step {ckpt['step']}: pass --steps above "
                         "that to continue")
    warn_unused(cfg, explicit)
    return cfg, ckpt, identity


# -------------------------------------------------------------------------------------------------
# Model, sampler and trainer
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
                                      prediction=cfg.prediction)
    diffusion = diffusion.to(device)
    if cfg.sampler == "ats":
        sampler = sampler_cls(
            cfg.T, lambda x0, t, noise: diffusion.vlb_terms(model, x0, t, noise), cfg.channels,
            model=model, update_every=cfg.update_every, num_selected=cfg.num_selected,
            queue_size=cfg.queue_size, policy_lr=cfg.policy_lr, entropy_coef=cfg.entropy_coef,
            policy_grad_clip=cfg.policy_grad_clip, probe_batch=cfg.probe_batch,
            sweep_stride=cfg.sweep_stride, seed=cfg.seed, device=device)
    else:
        sampler = heuristics.make_sampler(cfg.sampler, cfg.T, diffusion.abar.cpu(),
                                          cfg.lognormal_mean, cfg.lognormal_std)
    weights = heuristics.loss_weights(cfg.weighting, diffusion.abar.cpu(), snr_gamma=cfg.snr_gamma)
    trainer = ats.Trainer(model, diffusion, sampler, lr=cfg.lr, warmup=cfg.warmup,
                          grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, amp=cfg.amp,
                          compile=cfg.compile, loss_weights=weights, seed=cfg.seed, **trainer_kw)
    return trainer


# -------------------------------------------------------------------------------------------------
# Evaluation and logging: FID over training, the log line (pictures.py draws the rest)
# -------------------------------------------------------------------------------------------------


def evaluate_fid(cfg, trainer, scorer, rank, world, log_file):
    """FID and KID of the EMA weights: sampled on every rank, scored and logged by rank 0."""
    import fid
    tic = time.time()
    if rank == 0:
        print(f"step {trainer.step}/{cfg.steps} | FID: {cfg.fid_n} EMA samples, DDIM-"
              f"{cfg.sample_steps} ...", flush=True)
    with memory_for("--fid-batch"):
        images = fid_samples(cfg, trainer, rank, world)
    if rank > 0:
        return
    try:
        result = scorer(images)
    except fid.FidError as e:  # one line; the checkpoint of this step is already safe
        raise SystemExit(f"error: FID at step {trainer.step}: {e}") from None
    record = {"step": trainer.step, "fid": result["fid"], "kid": result["kid"],
              "kid_std": result["kid_std"], "fid_n": result["n"], "fid_ref": result["reference"],
              "fid_seconds": round(time.time() - tic, 1)}
    print(f"step {trainer.step}/{cfg.steps} | FID {record['fid']:.3f} | KID {record['kid']:.5f} ± "
          f"{record['kid_std']:.5f} | {record['fid_n']} samples against {record['fid_ref']}, "
          f"DDIM-{cfg.sample_steps}, {record['fid_seconds']:.0f} s", flush=True)
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def log_line(cfg, step, loss, lr, ips, summary, log_file):
    """One console line and one JSON line: step, loss, lr, images/s, ETA, where ATS looks."""
    eta = (cfg.steps - step) * cfg.batch_size / ips
    line = (f"step {step}/{cfg.steps} | loss {loss:.4f} | {ips:.0f} img/s | "
            f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
    if summary:
        line += (f" | mean t {summary['mean_t']:.0f} | quarters {summary['quarters']}"
                 f" | update KL {summary.get('kl_step', 0):.3f}")
    print(line, flush=True)
    log_file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "img_per_s": ips,
                               "sampler": summary}) + "\n")
    log_file.flush()


# -------------------------------------------------------------------------------------------------
# The run: build, restore, then the loop in the locked out-dir (safety.py guards it)
# -------------------------------------------------------------------------------------------------


def train(cfg, ckpt, identity, device, rank, world):
    """Build, restore and train; every check that can fail runs before the first write."""
    check(cfg, world)
    # Model, sampler and trainer: their constructors check every setting they are given
    try:
        with memory_for("--ch, --ch-mult, --num-res, --image-size or --T"):
            trainer = build(cfg, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        ats.ddim_timesteps(cfg.T, cfg.sample_steps)              # grids and FID use it
    except ValueError as e:
        raise SystemExit(f"error: --sample-steps: {e}") from None
    # FID: torch-fidelity, its weights and the reference are checked now, not after hours
    scorer = make_scorer(cfg, device) if cfg.fid_every and rank == 0 else None
    # Data: decoded once, and kept on the device when it fits
    with memory_for("--synthetic-n or --image-size" if cfg.dataset == "synthetic"
                    else "--image-size, or pass --on-device never"):
        data = load_data(cfg, device, rank, world)
    # Resume: the trainer, the random streams and the sampler's record continue exactly
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt)
        except (RuntimeError, KeyError, ValueError) as e:
            raise SystemExit(f"error: the checkpoint does not fit this code ({type(e).__name__}): "
                             "resume it with the version of ats that wrote it") from None
    torch.manual_seed(cfg.seed + rank)                            # dropout: a stream per rank
    if ckpt is not None and rank == 0:
        ats.set_rng_state(ckpt["rng"])
    log = SamplerLog(cfg.heatmap_height, ckpt["extra"].get("sampler_log") if ckpt else None)
    indices = batch_indices(len(data), cfg.batch_size // world, rank, world, cfg.seed, trainer.step)
    stream = augment(cfg, batches(cfg, data, indices, device), trainer.generator)
    if rank == 0:
        if importlib.util.find_spec("matplotlib") is None:
            print("metrics.png skipped: matplotlib is not installed (pip install matplotlib); the "
                  "numbers are in log.jsonl", flush=True)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        where = " on the device" if isinstance(data, torch.Tensor) else ""
        print(f"{cfg.preset}: {n_params / 1e6:.2f}M parameters, {cfg.sampler} sampler, {len(data)} "
              f"images{where}, {world} process(es) on {device}, from step {trainer.step}",
              flush=True)
    # The loop, in the locked out-dir: Trainer.run takes the steps; between them, log, save, draw,
    # score and watch for signals
    lower = "--batch-size, --ch or --image-size" + (", or --probe-batch" if cfg.sampler == "ats"
                                                     else "")
    with (claim_out_dir(cfg, ckpt, identity, trainer, rank), Interrupt(world > 1) as interrupt,
          memory_for(lower)):
        try:
            stop = loop(cfg, ckpt, trainer, stream, log, scorer, interrupt, device, rank, world)
        except FloatingPointError as e:                                # the ATS policy diverged
            raise SystemExit(f"error: at step {trainer.step} {e}; stopped without saving, so "
                             f"{cfg.out_dir}/ckpt.pt (if any) holds the last good checkpoint. "
                             "Resume with a lower --policy-lr.") from None
    if stop:
        if rank == 0:
            why = {"lost launcher": "the torchrun launcher is gone",
                   None: "another rank received a signal"}.get(interrupt.reason,
                                                               f"{interrupt.reason} received")
            print(f"interrupted at step {trainer.step} ({why}): saved {cfg.out_dir}/ckpt.pt; "
                  "continue with --resume", flush=True)
        sys.exit(130)


def loop(cfg, ckpt, trainer, stream, log, scorer, interrupt, device, rank, world):
    """Train to cfg.steps or to a signal; True if a signal stopped it (after saving)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    saved = ckpt["step"] if ckpt else None                              # the step ckpt.pt holds
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    loss_sum, n, tic, agree_every, stop = torch.zeros((), device=device), 0, time.time(), 1, False
    with log_file or contextlib.nullcontext(), peer_lost(trainer, lambda: kept(path, saved), world):
        for loss in trainer.run(stream, cfg.steps):
            step, loss_sum, n = trainer.step, loss_sum + loss, n + 1
            if trainer.sampler_stats:
                log.record(step - 1, trainer.sampler_stats, cfg.update_every)
            if step % agree_every == 0:  # ranks agree on a signal every ~2 s, not every step
                stop, agree_every = agree(interrupt.flag, time.time() - tic, n, device, world)
            last = step == cfg.steps
            due = {"log": step % cfg.log_every == 0,
                   "ckpt": step % cfg.ckpt_every == 0 or last or stop,
                   "grid": step % cfg.sample_every == 0 or last,
                   "milestone": cfg.milestone_every > 0 and step % cfg.milestone_every == 0,
                   "fid": cfg.fid_every > 0 and (step % cfg.fid_every == 0 or last) and not stop}
            if not any(due.values()):
                continue
            mean = mean_over_ranks(loss_sum / n, world)                 # syncs: the time is real
            if not math.isfinite(mean):
                raise SystemExit(f"error: the loss became {mean} by step {step}; stopped without "
                                 f"saving. {kept(path, saved)} Resume with a lower --lr, or try "
                                 "--amp none.")
            if due["ckpt"] or due["milestone"]:
                check_weights(trainer, path, saved)
            if rank == 0:
                ips = n * cfg.batch_size / (time.time() - tic)
                try:
                    outputs(cfg, trainer, log, mean, ips, log_file, due, saved)
                except OSError as e:  # a full disk, say, after the checkpoint was written
                    now = step if due["ckpt"] else saved
                    raise SystemExit(f"error: writing to {cfg.out_dir} failed at step {step} "
                                     f"({e.strerror or e}). {kept(path, now)} Make room, then "
                                     "--resume.") from None
            saved = step if due["ckpt"] else saved
            if due["fid"]:
                evaluate_fid(cfg, trainer, scorer, rank, world, log_file)
            if rank == 0 and (due["fid"] or due["grid"]):
                plot_metrics(cfg.out_dir)
            if due["log"] or due["fid"]:
                loss_sum, n, tic = torch.zeros((), device=device), 0, time.time()
            if stop:
                break
    return stop


def mean_over_ranks(x, world):
    """The mean of a tensor over the processes, as a float."""
    return (ats.all_reduce(x) / world).item()


def make_scorer(cfg, device):
    """fid.Scorer for --fid-ref, checked now (package, weights, reference), or one error line."""
    import fid
    try:
        return fid.Scorer(fid_reference(cfg), data_dir=cfg.data_dir, device=device)
    except fid.FidError as e:
        raise SystemExit(f"error: --fid-every: {e}") from None


def outputs(cfg, trainer, log, loss, ips, log_file, due, saved):
    """Rank 0's writing: the checkpoint (and milestone copy), the log line, grid and heatmap."""
    extra = {"sampler_log": log.state_dict()}
    if due["ckpt"]:
        save(cfg, trainer, "ckpt.pt", extra, saved)
    if due["milestone"]:
        save(cfg, trainer, f"ckpt_{trainer.step:07d}.pt", extra, saved)
    if due["log"]:
        log_line(cfg, trainer.step, loss, trainer.sched.get_last_lr()[0], ips, log.summary,
                 log_file)
    if due["grid"]:
        with memory_for("--sample-n"):
            save_grid(cfg, trainer, os.path.join(cfg.out_dir, f"grid_{trainer.step:07d}.png"))
        if log.history:
            with memory_for("--heatmap-height"):
                save_heatmap(log.history, os.path.join(cfg.out_dir, "sampler.png"),
                             cfg.heatmap_height, cfg.heatmap_range, log.steps)


def main(argv=None):
    """Configure, start the processes, train, and end with the run's exit code."""
    # Config: flags over the preset; on --resume, the stored run plus the RESUMABLE flags
    cfg, ckpt, identity = configure(argv)
    # Processes: one, or one per GPU under torchrun (NCCL on CUDA, gloo on CPU)
    local_rank, owns_group = int(os.environ.get("LOCAL_RANK", 0)), False
    try:
        device = ats.pick_device(cfg.device, local_rank)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}") from None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    rank, world = ats.rank_and_size()
    code = None
    try:
        train(cfg, ckpt, identity, device, rank, world)
    except SystemExit as e:                     # a one-line error, or 130 after a signal
        code = e.code
    except UnreadableImage as e:  # from a DataLoader worker: its message carries a traceback
        code = "error: " + str(e)[str(e).rindex("cannot read image"):].strip()
    # Done: the exception, its traceback and with them train()'s frames are gone now. A signal from
    # here on (torchrun's SIGTERM after another rank stopped) is ignored: the run is ending anyway.
    late = {s: signal.signal(s, signal.SIG_IGN) for s in Interrupt.SIGNALS}
    if owns_group:
        # The Trainer (a reference cycle, through its LR schedule) and its DDP module hold the
        # process group. Collected first, they let destroy_process_group join gloo's threads; left
        # to interpreter shutdown, a gloo thread can abort a finished run with SIGABRT.
        gc.collect()
        dist.destroy_process_group()
    for s, handler in late.items():
        signal.signal(s, handler)
    if code not in (None, 0):
        raise SystemExit(code)


if __name__ == "__main__":
    main()
