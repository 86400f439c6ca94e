"""Images from a train.py checkpoint: a grid, a folder of numbered PNGs, and their FID.

    python sample.py --ckpt runs/cifar10/ckpt.pt --grid samples.png
    python sample.py --ckpt runs/cifar10/ckpt.pt --n 50000 --out-dir samples/ --fid cifar10-train

The model is rebuilt from the checkpoint alone (EMA weights unless --no-ema). Image i's noise
depends only on (--seed, i), so a folder extended in several calls (rerun after an interruption,
or raise --n) holds exactly the images one call would make. Its samples.json ties it to the
checkpoint's content and records each image's SHA-256; a folder this script cannot vouch for is
refused. --fid (pip install torch-fidelity) scores the folder against a reference.
"""

import argparse
import hashlib
import io
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
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--n", type=int, default=64, help="images; with --out-dir, the folder's total")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--grid", help="write this call's images as one grid to this PNG file")
    p.add_argument("--out-dir", help="write numbered PNGs (000000.png, ...) here, continuing")
    p.add_argument("--fid", metavar="REF", help="FID and KID of --out-dir against "
                   "'cifar10-train' or a folder of real images")
    p.add_argument("--data-dir", default="./data", help="where CIFAR-10 lives, for --fid")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--ddpm", action="store_true", help="full T-step ancestral DDPM sampling")
    p.add_argument("--seed", type=int, default=0, help="image i draws its noise from (seed, i)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = p.parse_args(argv)
    if not (args.grid or args.out_dir) or (args.fid and not args.out_dir):
        p.error("say where the images go (--grid FILE and/or --out-dir DIR); --fid needs --out-dir")
    if min(args.n, args.batch_size) < 1:
        p.error("--n and --batch-size must be at least 1")
    return args


class FID:
    """FID and KID against `reference` ('cifar10-train' or a folder of images), by torch-fidelity
    with its TensorFlow-compatible Inception; what can fail offline is checked on creation."""

    feature_extractor = "inception-v3-compat"           # the tests put a small one in its place

    def __init__(self, reference, data_dir="./data", device=None):
        try:
            import torch_fidelity
            from torch_fidelity.utils import create_feature_extractor
            from torch_fidelity.utils import resolve_feature_layer_for_metric as layer
        except ImportError:
            raise ValueError("FID needs torch-fidelity: pip install torch-fidelity") from None
        self.tf, self.reference = torch_fidelity, reference
        self.kwargs = dict(cuda=torch.device(device or "cpu").type == "cuda", verbose=False,
                           feature_extractor=self.feature_extractor, datasets_root=data_dir,
                           datasets_download=False, save_cpu_ram=True)
        try:
            if reference == "cifar10-train":
                torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
            elif not os.path.isdir(reference):
                raise ValueError(f"{reference!r} is neither a folder nor 'cifar10-train'")
            create_feature_extractor(self.feature_extractor, [layer(
                "fid", feature_extractor=self.feature_extractor)], cuda=False, verbose=False)
        except Exception as e:  # no CIFAR-10 and no network, no Inception weights and no network
            raise ValueError(f"FID cannot run here ({type(e).__name__}: {str(e)[:200]}): the "
                             "reference must be readable, and torch-fidelity downloads its "
                             "Inception weights on first use") from None

    def __call__(self, images):
        """FID and KID of a uint8 (N, C, H, W) tensor or a folder of images: a dict."""
        if torch.is_tensor(images):
            images = Images(images)
        n = len(images) if isinstance(images, Images) else sum(
            f.lower().endswith((".png", ".jpg", ".jpeg")) for f in os.listdir(images))
        m = self.tf.calculate_metrics(input1=images, input2=self.reference, fid=True, kid=True,
                                      kid_subset_size=min(1000, n // 2), **self.kwargs)
        return {"fid": m[self.tf.KEY_METRIC_FID], "kid": m[self.tf.KEY_METRIC_KID_MEAN],
                "kid_std": m[self.tf.KEY_METRIC_KID_STD], "n": n, "reference": self.reference}


class Images(torch.utils.data.Dataset):
    """A uint8 (N, C, H, W) tensor as torch-fidelity reads it: RGB, grey repeated."""

    def __init__(self, images):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def open_folder(out_dir, made_from):
    """The SHA-256 of each image out_dir holds, after checking that every one is there byte for
    byte and was made as `made_from` says; a folder it cannot vouch for is refused."""
    record = os.path.join(out_dir, "samples.json")
    if not os.path.exists(record):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise ValueError(f"{out_dir} holds files but no samples.json: use a new --out-dir")
        os.makedirs(out_dir, exist_ok=True)
        return []
    with open(record) as f:
        old = json.load(f)                      # JSONDecodeError is a ValueError: one line too
    if not (isinstance(old, dict) and isinstance(old.get("sha256"), list)):
        raise ValueError(f"{record} is not a record this script wrote: use a new --out-dir")
    if {k: old.get(k) for k in made_from} != made_from:
        raise ValueError(f"{out_dir} holds images made otherwise ({old}): use another --out-dir")
    digests, names = old["sha256"], set(os.listdir(out_dir)) - {"samples.json", "fid.json"}
    for name in names - {f"{i:06d}.png" for i in range(len(digests))}:
        if not re.fullmatch(r"\d{6,}\.png(\.tmp)?|samples\.json\.tmp", name):
            raise ValueError(f"{out_dir} holds {name}, which this script did not make: move it "
                             "out, or use a new --out-dir")
        os.remove(os.path.join(out_dir, name))   # what an interrupted call left: made again
    for i, digest in enumerate(digests):
        path = os.path.join(out_dir, f"{i:06d}.png")
        if not os.path.isfile(path) or sha256(path) != digest:
            raise ValueError(f"{path} is missing or not the image this script wrote: the folder "
                             "was changed; use a new --out-dir")
    return digests


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def save_png(image, path):
    """One image, written atomically; returns the SHA-256 of its bytes."""
    buffer = io.BytesIO()
    torchvision.utils.save_image(image, buffer, format="png")
    with open(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + ".tmp", path)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


@torch.no_grad()
def make_images(model, diffusion, index, seed, steps, amp, device, ddpm=False):
    """Images number `index` (a range) in [-1, 1], image i from the noise of (seed, i) alone, by
    DDIM on `steps` timesteps (or all-T DDPM), in batches of at most 500: (n, C, H, W)."""
    C, size = model.config["in_ch"], model.config["image_size"]
    out = [torch.zeros(0, C, size, size, device=device)]
    for start in range(index.start, index.stop, 500):
        part = range(start, min(start + 500, index.stop))
        gens, shape = ats.image_generators(seed, part), (len(part), C, size, size)
        with ats.autocast(device, amp):
            out.append(ats.ddpm_sample(diffusion, model, shape, generator=gens) if ddpm else
                       ats.ddim_sample(diffusion, model, shape, steps=steps, generator=gens))
    return torch.cat([x.float() for x in out])


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, ats.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        print("interrupted: every image written is whole; the same command makes the rest",
              file=sys.stderr)
        raise SystemExit(130) from None


def run(args):
    device = ats.pick_device(args.device)
    fid = FID(args.fid, args.data_dir, device) if args.fid else None   # fails now, not after hours
    ckpt = ats.load_checkpoint(args.ckpt)
    model, diffusion = ats.load_model(ckpt, device, ema=not args.no_ema)
    if not args.ddpm:
        ats.ddim_timesteps(diffusion.T, args.steps)
    made_from = {"ckpt_sha256": sha256(args.ckpt), "seed": args.seed,
                 "weights": "raw" if args.no_ema else "ema",
                 "method": "ddpm" if args.ddpm else f"ddim-{args.steps}"}
    digests = open_folder(args.out_dir, made_from) if args.out_dir else []
    first = len(digests) if args.out_dir else 0
    images, tic = [], time.time()
    for start in range(first, args.n, args.batch_size):
        index = range(start, min(start + args.batch_size, args.n))
        x = make_images(model, diffusion, index, args.seed, args.steps, ckpt["config"]["amp"],
                        device, args.ddpm)
        x = ((x + 1) / 2).cpu()                                          # (b, C, H, W) in [0, 1]
        if args.out_dir:
            digests += [save_png(img, os.path.join(args.out_dir, f"{i:06d}.png"))
                        for i, img in zip(index, x)]
            write_json(os.path.join(args.out_dir, "samples.json"), {**made_from, "sha256": digests})
        images += [x] if args.grid else []
        print(f"images {index[-1] + 1}/{args.n}, {time.time() - tic:.0f}s", flush=True)
    if args.grid and images:
        torchvision.utils.save_image(torch.cat(images), args.grid,
                                     nrow=math.ceil(math.sqrt(sum(map(len, images)))))
    if fid is not None:
        result = fid(args.out_dir)
        write_json(os.path.join(args.out_dir, "fid.json"), {**result, "samples": made_from})
        print(f"FID {result['fid']:.3f}  KID {result['kid']:.5f} ± {result['kid_std']:.5f}  "
              f"({result['n']} images against {args.fid})")


if __name__ == "__main__":
    main()
