"""The training data: uint8 (N, C, H, W) images of CIFAR-10, a folder or synthetic shapes, kept on
the device when they fit, else streamed from disk by DataLoader workers; the endless, resumable
batch order; flips.

    data = load_data(cfg, device, rank, world)             # cfg: a train.Config
    indices = batch_indices(len(data), per_rank, rank, world, seed, start_step)
    stream = augment(cfg, batches(cfg, data, indices, device), generator)   # x0 in [-1, 1]
"""

import os

import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as tvt
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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


class UnreadableImage(Exception):
    """An image file that PIL cannot decode; train.py stops with one line naming it."""


class ImageFiles(Dataset):
    """Every image under `root` (recursively), as grey or RGB, resized and centre-cropped:
    uint8 (C, H, W)."""

    def __init__(self, root, size, channels):
        exts = torchvision.datasets.folder.IMG_EXTENSIONS
        self.files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                            if f.lower().endswith(exts))
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = tvt.Compose([tvt.Resize(size), tvt.CenterCrop(size), tvt.PILToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert(self.mode))
        except (OSError, Image.DecompressionBombError) as e:
            raise UnreadableImage(f"cannot read image {self.files[i]} ({e}): remove or replace "
                                  "it") from None


def make_dataset(cfg):
    """A uint8 (N, C, H, W) tensor (synthetic, CIFAR-10), or a dataset of uint8 (C, H, W) images."""
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
        tarball = os.path.join(cfg.data_dir, torchvision.datasets.CIFAR10.filename)
        if os.path.isfile(tarball) and not torchvision.datasets.utils.check_integrity(
                tarball, torchvision.datasets.CIFAR10.tgz_md5):
            raise SystemExit(f"error: {tarball} is corrupt (its MD5 is not CIFAR-10's): delete it "
                             "and run again to download it, or put a good copy there") from None
        raise SystemExit(f"error: CIFAR-10 is not in {cfg.data_dir!r} and could not be downloaded "
                         f"({type(e).__name__}). Put cifar-10-python.tar.gz from "
                         "https://www.cs.toronto.edu/~kriz/cifar.html into that folder (or point "
                         "--data-dir at it), or train offline with --dataset synthetic or "
                         "--dataset folder.") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)            # (50000, 3, 32, 32) uint8
    if cfg.image_size != 32:
        images = tvt.Resize(cfg.image_size, antialias=True)(images)     # square in, square out
    return images.contiguous()


def fits_on_device(cfg, n, device):
    """Whether n decoded images take at most a quarter of the device's memory (or --on-device)."""
    if cfg.on_device != "auto":
        return cfg.on_device == "yes"
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return n * cfg.channels * cfg.image_size**2 <= total / 4


def load_data(cfg, device, rank, world):
    """The dataset, decoded into one uint8 tensor when it fits on the device (--on-device).
    Rank 0 downloads; the others wait, then read."""
    if rank == 0:
        data = make_dataset(cfg)
    if world > 1:
        dist.barrier()                                                 # rank 0 has downloaded
    if rank > 0:
        data = make_dataset(cfg)
    if not isinstance(data, torch.Tensor) and fits_on_device(cfg, len(data), device):
        data = torch.stack([data[i] for i in range(len(data))])          # decodes every file now
    return data


def batch_indices(n, per_rank, rank, world, seed, start_step):
    """Endless lists of per-rank image indices. Epoch e is DistributedSampler's order e, so a
    resumed run picks up in place; the last incomplete batch of each epoch is dropped."""
    order = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                               drop_last=True)
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
    """uint8 batches on `device`: indexed from a resident tensor, or loaded by DataLoader workers.
    """
    if isinstance(data, torch.Tensor):
        data = data.to(device)
        return (data[torch.tensor(i, device=device)] for i in indices)
    loader = DataLoader(data, batch_sampler=indices, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    return (b.to(device, non_blocking=True) for b in loader)


def augment(cfg, stream, generator):
    """uint8 -> [-1, 1], with horizontal flips drawn from the trainer's (checkpointed) generator."""
    for x in stream:
        x0 = x.float() / 127.5 - 1                                       # (B, C, H, W) in [-1, 1]
        if cfg.hflip:
            flip = torch.rand(len(x0), 1, 1, 1, generator=generator, device=x0.device) < 0.5
            x0 = torch.where(flip, x0.flip(3), x0)
        yield x0
