"""Generate images from a train.py checkpoint: a grid, numbered PNGs for FID tools, or both.

    python sample.py --ckpt runs/cifar10/ckpt.pt --grid samples.png
    python sample.py --ckpt runs/cifar10/ckpt.pt --n 50000 --out-dir samples/   # rerun to resume; raise --n to extend
    python -m pytorch_fid samples/ path/to/cifar10-train-stats.npz              # or torch-fidelity

The model is rebuilt from the checkpoint alone (it stores the U-Net's and the diffusion's arguments);
the EMA weights are used unless --no-ema. Image i's noise depends only on (--seed, i), so a folder
extended in several calls holds exactly the images one call would make. The folder's samples.json
records the checkpoint, seed and method, and a call that would mix in other images is refused.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torchvision

import ats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, e.g. runs/cifar10/ckpt.pt")
    p.add_argument("--n", type=int, default=64, help="images to make; with --out-dir, the total the folder should hold")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--grid", help="write the images made in this call as one grid PNG to this file")
    p.add_argument("--out-dir", help="write numbered PNGs (000000.png, ...) here, continuing after the last one")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--ddpm", action="store_true", help="full T-step ancestral DDPM sampling instead of DDIM")
    p.add_argument("--seed", type=int, default=0, help="image i draws its noise from (seed, i) alone")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return p.parse_args(argv)


def check_paths(args):
    """Refuse, before any sampling, outputs that cannot be written: one line each."""
    if not args.grid and not args.out_dir:
        raise SystemExit("error: say where the images go: --grid FILE and/or --out-dir DIR")
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("error: --n and --batch-size must be at least 1")
    if args.grid:
        folder = os.path.dirname(os.path.abspath(args.grid))
        if os.path.isdir(args.grid):
            raise SystemExit(f"error: --grid {args.grid} is a folder: give a file name such as samples.png")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise SystemExit(f"error: --grid {args.grid}: the folder {folder} does not exist or is not writable")
    if args.out_dir:
        existing = os.path.abspath(args.out_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            raise SystemExit(f"error: --out-dir {args.out_dir}: {existing} is not a writable folder")


def next_index(out_dir, made_from):
    """The number after the highest NNNNNN.png in out_dir, after checking that it holds images of `made_from`."""
    os.makedirs(out_dir, exist_ok=True)
    record = os.path.join(out_dir, "samples.json")
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
        if old != made_from:
            diff = ", ".join(f"{k} {old.get(k)!r} (now {v!r})" for k, v in made_from.items() if old.get(k) != v)
            raise SystemExit(f"error: {out_dir} holds images made with {diff}: use another --out-dir")
    else:
        with open(record, "w") as f:
            json.dump(made_from, f, indent=1)
    taken = [int(m.group(1)) for f in os.listdir(out_dir) if (m := re.fullmatch(r"(\d+)\.png", f))]
    return max(taken, default=-1) + 1


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA GPU is visible: use --device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    device = pick_device(args.device)
    try:
        ckpt = ats.load_checkpoint(args.ckpt)
        model, diffusion = ats.load_model(ckpt, device, ema=not args.no_ema)
    except ats.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {args.ckpt!r} does not hold a model that this code can rebuild "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not args.ddpm and not 1 <= args.steps <= diffusion.T:
        raise SystemExit(f"error: --steps must be in [1, {diffusion.T}] (the model's T)")
    method = "ddpm" if args.ddpm else f"ddim-{args.steps}"
    made_from = {"ckpt": os.path.abspath(args.ckpt), "step": ckpt["step"], "seed": args.seed,
                 "weights": "raw" if args.no_ema else "ema", "method": method}
    first = next_index(args.out_dir, made_from) if args.out_dir else 0
    todo = args.n - first if args.out_dir else args.n
    if todo <= 0:
        print(f"{args.out_dir} already holds {first} images (--n {args.n}): nothing to do")
        return
    shape = (model.config["in_ch"], model.config["image_size"], model.config["image_size"])
    starts = range(first, first + todo, args.batch_size)
    print(f"{todo} images from {args.ckpt} (step {ckpt['step']}, {made_from['weights']} weights), {method}, "
          f"{len(starts)} batch(es)", flush=True)
    images, tic, tty = [], time.time(), sys.stdout.isatty()
    for b, start in enumerate(starts, start=1):
        index = range(start, min(start + args.batch_size, first + todo))
        gens = [torch.Generator().manual_seed(hash((args.seed, i))) for i in index]   # noise per image index
        progress = (lambda i, n, b=b: print(f"\rbatch {b}/{len(starts)}  step {i}/{n}  {time.time() - tic:.0f}s",
                                            end="", flush=True)) if tty else None
        with torch.no_grad(), ats.autocast(device, ckpt["config"].get("amp", "auto")):
            if args.ddpm:
                x = diffusion.ddpm_sample(model, (len(index), *shape), generator=gens, progress=progress)
            else:
                x = diffusion.ddim_sample(model, (len(index), *shape), steps=args.steps, generator=gens,
                                          progress=progress)
        x = ((x.float() + 1) / 2).cpu()                                    # (b, C, H, W) in [0, 1]
        if args.out_dir:
            for i, img in zip(index, x):
                torchvision.utils.save_image(img, os.path.join(args.out_dir, f"{i:06d}.png"))
        if args.grid:
            images.append(x)
        print(("\n" if tty else "") + f"batch {b}/{len(starts)} done, {time.time() - tic:.0f}s", flush=True)
    if args.grid:
        grid = torch.cat(images)
        torchvision.utils.save_image(grid, args.grid, nrow=math.ceil(math.sqrt(len(grid))))
    print(f"wrote {todo} images{' to ' + args.out_dir if args.out_dir else ''}"
          f"{' and the grid ' + args.grid if args.grid else ''} in {time.time() - tic:.0f}s")


if __name__ == "__main__":
    main()
