"""ATS in a diffusers training loop: UNet2DModel and DDPMScheduler trained the way diffusers' own
examples train them (the scheduler's add_noise, AdamW with warm-up from lr 0, gradient
accumulation), with the timesteps drawn by ATS instead of uniformly. Offline, on scikit-learn's
8x8 digits.

    pip install -e ".[diffusers]"                  # this repository, diffusers, scikit-learn
    python examples/diffusers_ats.py --steps 300 --out runs/diffusers
    python examples/diffusers_ats.py --steps 600 --out runs/diffusers   # continues from state.pt

The lines that ATS adds to an ordinary diffusers loop are marked "# ATS". The scheduler gives
ats.GaussianDiffusion its betas, prediction type and variance, which define the VLB terms that
ATS's reward needs (diffusers has none). Under gradient accumulation the sampler is entered once
per optimizer step, on the accumulated batch, so its f_S counts optimizer steps. Ctrl-C saves.
"""

import argparse
import fcntl
import math
import os
import signal
import sys

import torch
import torch.nn.functional as F

try:
    import ats  # ATS
except ImportError:
    raise SystemExit("error: this example imports ats: pip install -e . in the repo") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps in all")
    p.add_argument("--out", default="runs/diffusers", help="folder for state.pt (resumed if there)")
    p.add_argument("--batch-size", type=int, default=32, help="images per micro-batch")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="learning-rate warm-up steps, from 0")
    p.add_argument("--beta-schedule", default="linear",
                   choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    p.add_argument("--prediction-type", default="epsilon",
                   choices=("epsilon", "v_prediction", "sample"))
    p.add_argument("--update-every", type=int, default=20, help="ATS f_S, in optimizer steps")
    p.add_argument("--sweep-stride", type=int, default=10,
                   help="ATS probes every k-th timestep (1: all T, the paper's)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--channels", default="16,32", help="UNet2DModel block_out_channels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = (args.steps, args.batch_size, args.accumulate, args.update_every, args.sweep_stride,
              args.log_every)
    if min(counts) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --accumulate, --update-every, --sweep-stride and "
                "--log-every must be >= 1, --warmup >= 0")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    try:
        args.channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        p.error(f"--channels takes comma-separated integers such as 16,32, got {args.channels!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file: name a folder")
    return args


def digits():
    """scikit-learn's 8x8 digits in [-1, 1]: (1797, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: this example trains on scikit-learn's digits: "
                         "pip install scikit-learn") from None
    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None]
    return images / 8 - 1


def build(args, device):
    """The diffusers model, noise scheduler, optimizer and warm-up schedule."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_constant_schedule_with_warmup
    except ImportError:
        raise SystemExit("error: this example needs diffusers: pip install diffusers") from None
    torch.manual_seed(args.seed)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=args.channels, norm_num_groups=min(args.channels),
                        down_block_types=("DownBlock2D",) * len(args.channels),
                        up_block_types=("UpBlock2D",) * len(args.channels)).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.beta_schedule,
                              prediction_type=args.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    warmup = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=args.warmup)
    return model, scheduler, optimizer, warmup


def save(path, model, optimizer, warmup, sampler, step, gen, args):
    """state.pt, written to a temporary file and renamed, so a crash leaves the last one whole."""
    fixed = {k: v for k, v in vars(args).items() if k not in ("steps", "out", "log_every")}
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "warmup": warmup.state_dict(), "step": step, "generator": gen.get_state(),
                "sampler": sampler.state_dict(), "args": fixed}, path + ".tmp")  # ATS: its state
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = digits().to(device)
    model, scheduler, optimizer, warmup = build(args, device)
    diffusion = ats.GaussianDiffusion.from_diffusers(scheduler).to(device)      # ATS
    unet = lambda x, t: model(x, t).sample          # ATS: diffusers returns an output object
    vlb = lambda x0, t, noise: diffusion.vlb_terms(unet, x0, t, noise)          # ATS
    sampler = ats.AdaptiveTimestepSampler(                                      # ATS
        scheduler.config.num_train_timesteps, vlb, in_channels=1, model=model,  # ATS
        update_every=args.update_every, sweep_stride=args.sweep_stride,         # ATS
        seed=args.seed, device=device)                                          # ATS
    os.makedirs(args.out, exist_ok=True)
    lock = open(os.path.join(args.out, "lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another run is using {args.out}: wait for it, or choose "
                         "another --out") from None
    path, step = os.path.join(args.out, "state.pt"), 0
    gen = torch.Generator(device).manual_seed(args.seed)
    if os.path.exists(path):
        state = torch.load(path, map_location=device, weights_only=True)
        fixed = {k: v for k, v in vars(args).items() if k not in ("steps", "out", "log_every")}
        if state["args"] != fixed:
            changed = sorted(k for k in fixed if state["args"].get(k) != fixed[k])
            raise SystemExit(f"error: {path} was trained with other settings ({', '.join(changed)}"
                             "): use the same ones, or another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        warmup.load_state_dict(state["warmup"])
        sampler.load_state_dict(state["sampler"])                               # ATS
        step = state["step"]
        gen.set_state(state["generator"])
        print(f"resumed from {path} at step {step}")
    if step >= args.steps:
        raise SystemExit(f"error: {path} is already at step {step}: pass a larger --steps")
    model.train()
    stop = []                                   # Ctrl-C or SIGTERM: finish the step, save, exit
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args, data, model, scheduler, optimizer, warmup, sampler, step, gen, path, stop)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def train(args, data, model, scheduler, optimizer, warmup, sampler, step, gen, path, stop):
    """The loop, to --steps or to a signal; saves state.pt at the end either way."""
    device = data.device
    while step < args.steps:
        images, times, total = [], [], 0.0       # ATS: the accumulated batch's x0 and t
        for _ in range(args.accumulate):            # gradient accumulation, as accelerate's
            x0 = data[torch.randint(0, len(data), (args.batch_size,), generator=gen,
                                    device=device)]
            t = sampler.sample(x0, generator=gen)  # ATS: was torch.randint(0, T, (B,))
            noise = torch.randn(x0.shape, generator=gen, device=device)
            xt = scheduler.add_noise(x0, noise, t)
            target = {"epsilon": noise, "sample": x0}.get(args.prediction_type)
            if target is None:
                target = scheduler.get_velocity(x0, noise, t)
            loss = F.mse_loss(model(xt, t).sample, target) / args.accumulate
            loss.backward()
            images.append(x0)                      # ATS
            times.append(t)                        # ATS
            total += loss.item()
        if not math.isfinite(total):
            raise SystemExit(f"error: the loss became {total} at step {step}; stopped "
                             f"without saving, so {path} (if any) holds the last good state. "
                             "Try a lower --lr.")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # accelerate: `if accelerator.sync_gradients:` marks this micro-step
        with sampler.around_update(torch.cat(images), torch.cat(times)):        # ATS
            optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            p = sampler.probs(x0).mean(0).cpu()    # where the policy looks now, batch mean
            quarters = [round(float(q.sum()), 3) for q in p.chunk(4)]
            print(f"step {step}/{args.steps} | loss {total:.4f} | mean t "
                  f"{float((p * torch.arange(len(p))).sum()):.0f} | quarters {quarters}",
                  flush=True)
        if stop:
            save(path, model, optimizer, warmup, sampler, step, gen, args)
            print(f"interrupted: saved {path} at step {step}; the same command continues",
                  file=sys.stderr)
            raise SystemExit(130)
    save(path, model, optimizer, warmup, sampler, step, gen, args)
    print(f"saved {path} at step {step}; the same command with a larger --steps continues")


if __name__ == "__main__":
    main()
