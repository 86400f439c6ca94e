"""Generate images from a train.py checkpoint: a grid, numbered PNGs for FID tools, or both.

    python sample.py --ckpt runs/cifar10/ckpt.pt --grid samples.png
    python sample.py --ckpt runs/cifar10/ckpt.pt --n 50000 --out-dir samples/   # rerun to resume; raise --n to extend
    python -m pytorch_fid samples/ path/to/cifar10-train-stats.npz              # or torch-fidelity

The model is rebuilt from the config stored in the checkpoint; the EMA weights are used unless --no-ema.
"""

import argparse
import math
import os
import re
import time

import torch
import torchvision

import ats
import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. runs/cifar10/ckpt.pt")
    p.add_argument("--n", type=int, default=64, help="images to make; with --out-dir, the total the folder should hold")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--grid", help="write the images made in this call as one grid PNG to this file")
    p.add_argument("--out-dir", help="write numbered PNGs (000000.png, ...) here, continuing after the last one")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--ddpm", action="store_true", help="full T-step ancestral DDPM sampling instead of DDIM")
    p.add_argument("--seed", type=int, default=0, help="batch i draws its noise from (seed, index of its first image)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return p.parse_args(argv)


def load_model(path, device, ema=True):
    """(eps_theta in eval mode, diffusion, config) rebuilt from the checkpoint alone, loaded weights_only."""
    try:
        ckpt = ats.load_checkpoint(path)
        cfg = train.config_from_dict(ckpt["config"])
        model, diffusion = train.build_model(cfg, device)
        if ema:  # the EMA is an AveragedModel: its keys are 'module.*' plus 'n_averaged', so load it as one
            averaged = torch.optim.swa_utils.AveragedModel(model)
            averaged.load_state_dict(ckpt["ema"])
            model = averaged.module
        else:
            model.load_state_dict(ckpt["model"])
    except ats.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {path!r} does not hold a model that this code can rebuild "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    return model.eval(), diffusion, cfg


def next_index(out_dir):
    """The number after the highest NNNNNN.png already in out_dir (0 for a new folder)."""
    taken = [int(m.group(1)) for f in os.listdir(out_dir) if (m := re.fullmatch(r"(\d+)\.png", f))]
    return max(taken, default=-1) + 1


def check(args, cfg):
    problems = [
        (not args.grid and not args.out_dir, "say where the images go: --grid FILE and/or --out-dir DIR"),
        (args.n < 1 or args.batch_size < 1, "--n and --batch-size must be at least 1"),
        (not args.ddpm and not 1 <= args.steps <= cfg.T, f"--steps must be in [1, {cfg.T}] (the model's T)"),
    ]
    for bad, message in problems:
        if bad:
            raise SystemExit(f"error: {message}")


def main(argv=None):
    args = parse_args(argv)
    device = train.pick_device(args.device)
    model, diffusion, cfg = load_model(args.ckpt, device, ema=not args.no_ema)
    check(args, cfg)
    first = 0
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        first = next_index(args.out_dir)
    todo = args.n - first if args.out_dir else args.n
    if todo <= 0:
        print(f"{args.out_dir} already holds {first} images (--n {args.n}): nothing to do")
        return
    n_batches, images, tic = math.ceil(todo / args.batch_size), [], time.time()
    print(f"{todo} images from {args.ckpt} ({'EMA' if not args.no_ema else 'raw'} weights), "
          f"{'DDPM, ' + str(cfg.T) if args.ddpm else 'DDIM, ' + str(args.steps)} steps, {n_batches} batch(es)")
    for b, start in enumerate(range(first, first + todo, args.batch_size), start=1):
        shape = (min(args.batch_size, first + todo - start), cfg.channels, cfg.image_size, cfg.image_size)
        gen = torch.Generator().manual_seed(hash((args.seed, start)))  # resumed runs redraw the same noise
        progress = lambda i, n, b=b: print(f"\rbatch {b}/{n_batches}  step {i}/{n}  {time.time() - tic:.0f}s",
                                      end="", flush=True)
        with torch.no_grad(), train.autocast(device, cfg.amp):
            if args.ddpm:
                x = diffusion.ddpm_sample(model, shape, generator=gen, progress=progress)
            else:
                x = diffusion.ddim_sample(model, shape, steps=args.steps, generator=gen, progress=progress)
        x = ((x.float() + 1) / 2).cpu()                                    # (b, C, H, W) in [0, 1]
        if args.out_dir:
            for i, img in enumerate(x, start=start):
                torchvision.utils.save_image(img, os.path.join(args.out_dir, f"{i:06d}.png"))
        if args.grid:
            images.append(x)
    print()
    if args.grid:
        grid = torch.cat(images)
        torchvision.utils.save_image(grid, args.grid, nrow=math.ceil(math.sqrt(len(grid))))
    print(f"wrote {todo} images{' to ' + args.out_dir if args.out_dir else ''}"
          f"{' and the grid ' + args.grid if args.grid else ''} in {time.time() - tic:.0f}s")


if __name__ == "__main__":
    main()
