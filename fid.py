"""FID and KID of generated images against a reference set, computed by torch-fidelity.

    pip install torch-fidelity
    scorer = fid.Scorer("cifar10-train", data_dir="./data", device=device)  # checks it all now
    scorer(images)          # a uint8 (N, C, H, W) tensor -> {'fid', 'kid', 'kid_std', 'n'}
    scorer("samples/")      # a folder of PNG/JPEG images -> the same

torch-fidelity's 'inception-v3-compat' reproduces the TensorFlow Inception network of the original
FID (Heusel et al. 2017) to machine precision. FID uses its 2048-d pool features; KID (Binkowski
et al. 2018) is the unbiased MMD with a cubic polynomial kernel over 100 subsets of 1000 images
(half the set, for smaller sets), reported as mean and std over the subsets. The reference is
'cifar10-train' (the 50,000 CIFAR-10 training images, as in DDPM and the ATS release; read from or
downloaded to data_dir), another name torch-fidelity registers, or a folder of images. Reference
features are cached by torch-fidelity ($TORCH_HOME/fidelity_cache), so only the first evaluation
pays for them. Only the scripts that are asked for FID import this module.
"""

import hashlib
import os

import torch

FEATURE_EXTRACTOR = "inception-v3-compat"     # torch-fidelity's name; tests register a small one
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # what torch-fidelity reads from a folder
MIN_IMAGES = 4                                # KID needs two subsets of at least 2


class FidError(Exception):
    """FID cannot be computed here: the message says what is missing and how to fix it."""


class Images(torch.utils.data.Dataset):
    """A uint8 (N, C, H, W) tensor as torch-fidelity's input: RGB (grey is repeated), uint8."""

    def __init__(self, images):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class Scorer:
    """FID and KID against one reference. Everything that can fail offline is checked on creation:
    torch-fidelity itself, the feature network's weights and the reference images."""

    def __init__(self, reference, *, data_dir="./data", device=None, batch_size=200):
        try:
            import torch_fidelity
            from torch_fidelity.registry import DATASETS_REGISTRY
            from torch_fidelity.utils import create_feature_extractor as extractor
            from torch_fidelity.utils import resolve_feature_layer_for_metric as layer_for
        except ImportError:
            raise FidError("FID and KID need torch-fidelity: pip install torch-fidelity") from None
        self.tf, self.reference = torch_fidelity, reference
        cuda = device is not None and torch.device(device).type == "cuda"
        self.kwargs = dict(feature_extractor=FEATURE_EXTRACTOR, cuda=cuda,
                           batch_size=batch_size, datasets_root=data_dir, verbose=False,
                           save_cpu_ram=True)  # no DataLoader worker processes
        try:  # loads the weights; torch-fidelity downloads them into torch's hub cache if missing
            layer = layer_for("fid", feature_extractor=FEATURE_EXTRACTOR)
            extractor(FEATURE_EXTRACTOR, [layer], cuda=False, verbose=False)
        except Exception as e:
            raise FidError(missing_weights(e)) from None
        if reference in DATASETS_REGISTRY:
            self.n_ref = self.check_dataset(DATASETS_REGISTRY[reference], data_dir)
            self.kwargs.update(datasets_download=False)
        elif os.path.isdir(reference):
            files = sorted(f for f in os.listdir(reference) if f.lower().endswith(IMAGE_EXTENSIONS))
            if len(files) < MIN_IMAGES:
                raise FidError(f"the FID reference folder {reference} holds {len(files)} PNG or "
                               "JPEG images: give a folder of real images (or 'cifar10-train')")
            self.n_ref = len(files)
            self.kwargs.update(input2_cache_name=folder_cache_name(reference, files))
        else:
            raise FidError(f"the FID reference {reference!r} is neither a folder nor a dataset "
                           f"torch-fidelity knows ({', '.join(sorted(DATASETS_REGISTRY))})")

    def check_dataset(self, make, data_dir):
        """A registered dataset, read from (or downloaded to) data_dir now: its size."""
        try:
            return len(make(data_dir, True))
        except Exception as e:
            raise FidError(f"the FID reference {self.reference} is not in {data_dir} and could not "
                           f"be downloaded ({type(e).__name__}); for CIFAR-10, put cifar-10-python"
                           ".tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into that "
                           "folder") from None

    def __call__(self, images):
        """FID and KID of a uint8 (N, C, H, W) tensor or of a folder of images: a dict."""
        n = len(images) if torch.is_tensor(images) else count_images(images)
        if n < MIN_IMAGES:
            raise FidError(f"FID and KID need at least {MIN_IMAGES} images, got {n}")
        subset = min(1000, n // 2, self.n_ref // 2)          # KID's subsets: 1000, or half the set
        try:
            m = self.tf.calculate_metrics(
                input1=Images(images) if torch.is_tensor(images) else images,
                input2=self.reference, fid=True, kid=True, kid_subset_size=subset, **self.kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise FidError(f"FID failed ({type(e).__name__}: {str(e)[:200]}): check that both "
                           f"image sets are readable") from None
        return {"fid": m[self.tf.KEY_METRIC_FID], "kid": m[self.tf.KEY_METRIC_KID_MEAN],
                "kid_std": m[self.tf.KEY_METRIC_KID_STD], "n": n, "reference": self.reference}


def missing_weights(error):
    """The one line for a feature network whose weights cannot be loaded or downloaded."""
    if FEATURE_EXTRACTOR != "inception-v3-compat":
        return f"the FID feature network {FEATURE_EXTRACTOR} failed to load: {error}"
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    return (f"FID needs torch-fidelity's Inception weights, and they could not be loaded or "
            f"downloaded ({type(error).__name__}): download {URL_INCEPTION_V3} on a machine with "
            f"network access and put it at {path}")


def count_images(folder):
    return sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder))


def folder_cache_name(folder, files):
    """A cache key for a reference folder that changes whenever its images do."""
    digest = hashlib.sha256(os.path.realpath(folder).encode())
    for name in files:
        stat = os.stat(os.path.join(folder, name))
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "ats-folder-" + digest.hexdigest()[:16]
