"""Generate images from a train.py checkpoint: a grid, a folder of numbered PNGs, and their FID.

    python sample.py --ckpt runs/cifar10/ckpt.pt --grid samples.png
    python sample.py --ckpt runs/cifar10/ckpt.pt --n 50000 --out-dir samples/ --fid cifar10-train
    python sample.py --ckpt runs/cifar10/ckpt.pt --n 10000 --out-dir s/ --fid path/to/real/images

The model is rebuilt from the checkpoint alone; the EMA weights are used unless --no-ema. Image
i's noise depends only on (--seed, i), so a folder extended in several calls (rerun the command
after an interruption, or raise --n) holds exactly the images one call would make. The folder's
samples.json records where its images came from and how many are done; a folder whose images this
script cannot vouch for is refused. --fid (pip install torch-fidelity) prints FID and KID of the
folder and records them in its fid.json.
"""

import signal
import sys


def interrupted_while_starting(signum, frame):
    """A signal before the first image: one line and exit 130."""
    try:                                          # after SIGHUP the terminal may be gone
        print(f"interrupted while starting ({signal.Signals(signum).name}): no image was written",
              file=sys.stderr)
    except OSError:
        pass
    raise SystemExit(130)


if __name__ == "__main__":  # a signal while torch loads: one line, not an import traceback
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupted_while_starting)

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import time

import torch
import torchvision
from PIL import Image

import ats
from safety import memory_for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--n", type=int, default=64,
                   help="images to make; with --out-dir, the total the folder should hold")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--grid", help="write the images made in this call as one grid to this file")
    p.add_argument("--out-dir", help="write numbered PNGs (000000.png, ...) here, continuing")
    p.add_argument("--fid", metavar="REF",
                   help="FID and KID of the --out-dir images against 'cifar10-train' (the "
                        "standard reference) or a folder of real images")
    p.add_argument("--data-dir", default="./data", help="where CIFAR-10 lives, for --fid")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--ddpm", action="store_true", help="full T-step ancestral DDPM sampling")
    p.add_argument("--seed", type=int, default=0, help="image i draws its noise from (seed, i)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return p.parse_args(argv)


def check_args(args):
    """Refuse, before any sampling, settings and outputs that cannot work: one line each."""
    if not args.grid and args.out_dir is None:
        raise SystemExit("error: say where the images go: --grid FILE and/or --out-dir DIR")
    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("error: --n and --batch-size must be at least 1")
    if args.fid and not args.out_dir:
        raise SystemExit("error: --fid scores the images of --out-dir: give --out-dir DIR")
    if args.grid:
        check_grid_path(args.grid)
    if args.out_dir is not None:
        existing = os.path.abspath(args.out_dir) if args.out_dir else ""
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not existing or not os.path.isdir(existing) or not os.access(existing, os.W_OK):
            raise SystemExit(f"error: --out-dir {args.out_dir!r}: {existing or 'it'} is not a "
                             "writable folder")


def check_grid_path(grid):
    folder = os.path.dirname(os.path.abspath(grid))
    ext = os.path.splitext(grid)[1].lower()
    if ext not in Image.registered_extensions():
        raise SystemExit(f"error: --grid {grid}: unknown image type {ext or '(none)'}: "
                         "end the name with .png or .jpg")
    if os.path.exists(grid) and not os.path.isfile(grid):
        raise SystemExit(f"error: --grid {grid} exists and is not a regular file: give a file name "
                         "such as samples.png")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise SystemExit(f"error: --grid {grid}: the folder {folder} does not exist or is not "
                         "writable")


# -------------------------------------------------------------------------------------------------
# The folder: numbered PNGs written atomically, vouched for by samples.json
# -------------------------------------------------------------------------------------------------


def open_folder(out_dir, made_from):
    """The SHA-256 of each image out_dir holds already, in order, after checking that every one of
    them is there, byte for byte as written, and made as `made_from` says. Refuses, with one line,
    a folder it cannot vouch for."""
    record = os.path.join(out_dir, "samples.json")
    if not os.path.exists(record):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise SystemExit(f"error: {out_dir} holds files but no samples.json, so its images "
                             "cannot be vouched for: use an empty or new --out-dir")
        os.makedirs(out_dir, exist_ok=True)
        write_json(record, {**made_from, "count": 0, "sha256": []})
        return []
    try:
        with open(record) as f:
            old = json.load(f)
        count, digests = old.pop("count"), old.pop("sha256", None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: {record} is unreadable ({type(e).__name__}), so the folder's "
                         "images cannot be vouched for: use a new --out-dir") from None
    if old != made_from:
        diff = ", ".join(f"{k} {old.get(k)!r} (now {v!r})" for k, v in made_from.items()
                         if old.get(k) != v)
        raise SystemExit(f"error: {out_dir} holds images made with {diff}: use another --out-dir")
    if type(count) is not int or count < 0:
        raise SystemExit(f"error: {record} gives the count {count!r}, which no folder holds: it "
                         "was edited; use a new --out-dir")
    if not (isinstance(digests, list) and len(digests) == count):
        raise SystemExit(f"error: {record} does not record the SHA-256 of each of its {count} "
                         "images (an older sample.py wrote it, or it was edited), so they cannot "
                         "be vouched for: use a new --out-dir")
    names = set(os.listdir(out_dir))
    missing = [f"{i:06d}.png" for i in range(count) if f"{i:06d}.png" not in names]
    if missing:
        more = f" with {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SystemExit(f"error: {out_dir} should hold {count} images, but {missing[0]} is "
                         f"missing{more}: the folder was changed after it was written; use a new "
                         "--out-dir")
    for i, digest in enumerate(digests):
        check_image(os.path.join(out_dir, f"{i:06d}.png"), digest)
    remove_leftovers(out_dir, names, count)
    return digests


def check_image(path, digest):
    """Refuse, with one line, an image of the folder that is not, byte for byte, the file written:
    a link, a folder, a file changed, cut short or replaced (which also catches any that would
    not decode)."""
    kind = "a symbolic link" if os.path.islink(path) else "a folder" if os.path.isdir(path) else (
        None if os.path.isfile(path) else "not a regular file")
    if kind:
        raise SystemExit(f"error: {path} is {kind}, not an image this script wrote: put the image "
                         "back, or use a new --out-dir")
    try:
        with open(path, "rb") as f:
            same = hashlib.sha256(f.read()).hexdigest() == digest
    except OSError as e:
        raise SystemExit(f"error: cannot read {path} ({e.strerror}): make it readable, or use a "
                         "new --out-dir") from None
    if not same:
        raise SystemExit(f"error: {path} is not the image this script wrote (its SHA-256 differs "
                         "from samples.json's): the folder was changed after it was written; use "
                         "a new --out-dir")


def remove_leftovers(out_dir, names, count):
    """Remove what an interrupted call left (images past the count, temporary files), to be made
    again; refuse an image this script did not make, which an FID would count."""
    ours = re.compile(r"(\d{6,})\.png")
    for name in names:
        m, path = ours.fullmatch(name), os.path.join(out_dir, name)
        if (m and int(m.group(1)) >= count) or name.endswith(".tmp"):
            if os.path.isdir(path) and not os.path.islink(path):
                raise SystemExit(f"error: {path} is a folder, not a file this script wrote: move "
                                 "it out, or use a new --out-dir")
            os.remove(path)
        elif not m and os.path.splitext(name)[1].lower() in Image.registered_extensions():
            raise SystemExit(f"error: {out_dir} holds {name}, which this script did not make; it "
                             "would be counted in an FID: move it out, or use a new --out-dir")


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def save_png(image, path):
    """Write one image atomically (a crash leaves the old file or none, never half of one); return
    the SHA-256 of its bytes, for samples.json."""
    buffer = io.BytesIO()
    torchvision.utils.save_image(image, buffer, format="png")
    with open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    try:
        device = ats.pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}") from None
    scorer = make_scorer(args, device) if args.fid else None          # fails now, not after hours
    try:
        ckpt = ats.load_checkpoint(args.ckpt)
        model, diffusion = ats.load_model(ckpt, device, ema=not args.no_ema)
    except ats.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {args.ckpt!r} does not hold a model that this code can rebuild "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not args.ddpm:
        try:
            ats.ddim_timesteps(diffusion.T, args.steps)
        except ValueError as e:
            raise SystemExit(f"error: --steps: {e}") from None
    method = "ddpm" if args.ddpm else f"ddim-{args.steps}"
    made_from = {"ckpt": os.path.abspath(args.ckpt), "step": ckpt["step"], "seed": args.seed,
                 "weights": "raw" if args.no_ema else "ema", "method": method}
    shape = (model.config["in_ch"], model.config["image_size"], model.config["image_size"])
    lower = "--batch-size" + (", or --n: --grid holds every image of the call" if args.grid else "")
    try:
        digests = open_folder(args.out_dir, made_from) if args.out_dir else []
        first = len(digests)
        if args.fid and first > args.n:
            raise SystemExit(f"error: {args.out_dir} holds {first} images, more than --n {args.n}:"
                             f" the FID would count them all; pass --n {first} or more")
        check_space(args, shape, args.n - first)
        with memory_for(lower):
            images = generate(args, model, diffusion, ckpt, made_from, digests, shape, device)
        if args.grid and images is not None:
            torchvision.utils.save_image(images, args.grid, nrow=math.ceil(math.sqrt(len(images))))
            print(f"wrote the grid {args.grid}")
    except OSError as e:  # a read-only or full disk: every image written so far is whole
        raise SystemExit(f"error: writing the images failed ({e.strerror or e}): make room or "
                         "choose another place; the same command continues a folder") from None
    if scorer is not None:
        score(scorer, args, made_from)


def make_scorer(args, device):
    import fid
    try:
        return fid.Scorer(args.fid, data_dir=args.data_dir, device=device)
    except fid.FidError as e:
        raise SystemExit(f"error: --fid: {e}") from None


def check_space(args, shape, todo):
    """Refuse a folder or grid the disk cannot hold (PNGs take at most about C*H*W bytes each)."""
    need = max(todo, 0) * (math.prod(shape) + 200) * (bool(args.out_dir) + bool(args.grid))
    folder = args.out_dir or os.path.dirname(os.path.abspath(args.grid))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise SystemExit(f"error: {todo} images need up to {need / 1e6:.0f} MB, and {folder} has "
                         f"{free / 1e6:.0f} MB free: make room or choose another place")


def generate(args, model, diffusion, ckpt, made_from, digests, shape, device):
    """Sample images first .. n-1 in batches (first = len(digests), the images the folder holds),
    each image from its own noise; write them to the folder as they come, with their SHA-256.
    Returns the images of this call (for the grid), or None if none."""
    first = len(digests)
    todo = args.n - first if args.out_dir else args.n
    if todo <= 0:
        print(f"{args.out_dir} already holds {first} images (--n {args.n}): none to make")
        return None
    starts = range(first, first + todo, args.batch_size)
    print(f"{todo} images from {args.ckpt} (step {ckpt['step']}, {made_from['weights']} weights), "
          f"{made_from['method']}, {len(starts)} batch(es)", flush=True)
    images, tic, tty, done = [], time.time(), sys.stdout.isatty(), first
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)                         # a signal from here on: see below
    try:
        for b, start in enumerate(starts, start=1):
            index = range(start, min(start + args.batch_size, first + todo))
            progress = None
            if tty:
                progress = lambda i, n, b=b: print(f"\rbatch {b}/{len(starts)}  step {i}/{n}  "
                                                   f"{time.time() - tic:.0f}s", end="", flush=True)
            gens, batch_shape = ats.image_generators(args.seed, index), (len(index), *shape)
            with torch.no_grad(), ats.autocast(device, ckpt["config"].get("amp", "auto")):
                if args.ddpm:
                    x = ats.ddpm_sample(diffusion, model, batch_shape, generator=gens,
                                              progress=progress)
                else:
                    x = ats.ddim_sample(diffusion, model, batch_shape, steps=args.steps,
                                              generator=gens, progress=progress)
            x = ((x.float() + 1) / 2).cpu()                              # (b, C, H, W) in [0, 1]
            if args.out_dir:
                for i, img in zip(index, x):
                    digests.append(save_png(img, os.path.join(args.out_dir, f"{i:06d}.png")))
                write_json(os.path.join(args.out_dir, "samples.json"),
                           {**made_from, "count": len(digests), "sha256": digests})  # these: done
                done = len(digests)
            if args.grid:
                images.append(x)
            print(("\n" if tty else "") + f"batch {b}/{len(starts)} done, "
                  f"{time.time() - tic:.0f}s", flush=True)
    except KeyboardInterrupt:
        kept = (f"{args.out_dir} holds {done} complete images; the same command makes the rest"
                if args.out_dir else "no grid was written")
        print(f"\ninterrupted: {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:                                           # Python's defaults: no longer starting
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    where = f" to {args.out_dir}" if args.out_dir else ""
    print(f"wrote {todo} images{where} in {time.time() - tic:.0f}s")
    return torch.cat(images) if images else None


def stop(signum, _frame):
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal or ssh session) while sampling all stop it as
    Ctrl-C does: every image written is whole, and one line says how many are complete."""
    if signum == signal.SIGHUP and sys.stderr.isatty():  # the terminal is gone: printing to it
        sys.stdout = sys.stderr = open(os.devnull, "w")   # would fail before that line
    raise KeyboardInterrupt


def score(scorer, args, made_from):
    """FID and KID of the folder against the reference, printed and written to fid.json."""
    import fid
    tic = time.time()
    try:
        result = scorer(args.out_dir)
    except fid.FidError as e:
        raise SystemExit(f"error: --fid: {e}") from None
    result.update(samples=made_from, feature_extractor=fid.FEATURE_EXTRACTOR,
                  torch_fidelity=scorer.tf.__version__, seconds=round(time.time() - tic, 1))
    write_json(os.path.join(args.out_dir, "fid.json"), result)
    print(f"FID {result['fid']:.3f}  KID {result['kid']:.5f} ± {result['kid_std']:.5f}  "
          f"({result['n']} images against {args.fid}; {args.out_dir}/fid.json)")


if __name__ == "__main__":
    main()
