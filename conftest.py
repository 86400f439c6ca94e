"""Helpers and fixtures shared by the test files, in two tiers. The method's tests:

    test_ats.py          the bound, U-Net, sampler API, ATS, Trainer, checkpoints, the README's
                         snippets on the copied block
    test_baselines.py    loss weightings and the baseline samplers

and the rest of the suite:

    test_train.py        train.py: config, outputs and resume, the lock, signals, one-line
                         errors, FID over training, torchrun
    test_sample.py       sample.py: grids, the PNG folder it vouches for, Ctrl-C, --fid
    test_examples.py     examples/ and the other codebases' recipes (each skipped without its
                         package)
    experiments/test_lab.py   the lab: speed, converge, report, score, the variants

Everything runs on the CPU; helpers build tiny models and data so that a test takes seconds.
"""

import json
import math
import os
import socket
import time

import pytest
import torch
import torch.nn as nn

import ats
import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU OpenMP's spin-waits cost 10x;
    session-wide, so that module fixtures run on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------------
# Models, data and reference values built here, independently of the code under test
# -------------------------------------------------------------------------------------------------


def ddpm(T, schedule="linear", **kw):
    """GaussianDiffusion of a named schedule with T steps."""
    return ats.GaussianDiffusion(ats.make_betas(schedule, T), **kw)


def tiny_unet(in_ch=1, dropout=0.0, image_size=8):
    return ats.UNet(in_ch=in_ch, ch=16, ch_mult=(1, 2), num_res=1, attn_res=(4,), dropout=dropout,
                    image_size=image_size)


def blobs(n, size=8, seed=0):
    """A learnable toy dataset: one bright square per image on a dark background, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, size, size)
    corner = torch.randint(0, size - 3, (n, 2), generator=g)
    for i, (r, c) in enumerate(corner.tolist()):
        x[i, :, r:r + 3, c:c + 3] = 1.0
    return x


def batches(data, batch, seed):
    """Endless random minibatches of `data`."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(0, len(data), (batch,), generator=g)]


def linear_abar(T):
    """abar of DDPM's linear schedule, float64."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


def chi2_pvalue(t, p, min_expected=5.0):
    """Pearson chi-square p-value of draws t against probabilities p; small cells pooled."""
    obs, exp = torch.bincount(t, minlength=len(p)).double(), t.numel() * p.double()
    small = exp < min_expected
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum(0, keepdim=True)])
        exp = torch.cat([exp[~small], exp[small].sum(0, keepdim=True)])
    stat, df = ((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


class Oracle(nn.Module):
    """An eps-model that returns the true noise."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, xt, t):
        return self.noise


# -------------------------------------------------------------------------------------------------
# Samplers and trainers
# -------------------------------------------------------------------------------------------------


def ats_sampler(T, model, diffusion, **kw):
    vlb = lambda x0, t, n: diffusion.vlb_terms(model, x0, t, n)
    return ats.AdaptiveTimestepSampler(T, vlb, in_channels=1, model=model, **kw)


@torch.no_grad()
def nudge(model, seed=0, scale=1e-3):
    """A stand-in for an optimizer step: every weight moved by a little seeded noise."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def set_ab(sampler, a, b):
    """Make the policy give (a, b) for every image: zero last-layer weights, bias = softplus^-1."""
    last = sampler.policy[-1]
    with torch.no_grad():
        last.weight.zero_()
        y = torch.tensor([a, b], dtype=torch.float64) - 1e-5
        last.bias.copy_((y + (-(-y).expm1()).log()).float())  # softplus^-1(y), stable for large y


def entropy_gradient(sampler, delta, T=200):
    """d loss / d (a's bias) at a = 1 + delta, b = 1, zero reward, averaged over every t."""
    set_ab(sampler, 1 + delta, 1.0)
    sampler.policy.zero_grad()
    logp = sampler.log_probs(torch.zeros(1, 1, 4, 4)).expand(T, T)
    sampler.policy_loss(logp, torch.arange(T), torch.zeros(T)).backward()
    return sampler.policy[-1].bias.grad[0].abs().item()


def make_trainer(sampler="ats", seed=0, T=50, update_every=3, **kw):
    torch.manual_seed(seed)
    model = tiny_unet()
    d = ddpm(T)
    s = ats_sampler(T, model, d, update_every=update_every, seed=seed) if sampler == "ats" else \
        ats.UniformSampler(T)
    return ats.Trainer(model, d, s, lr=2e-3, warmup=5, ema_decay=0.9, seed=seed, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------------
# train.py at toy sizes
# -------------------------------------------------------------------------------------------------

TINY_CFG = dict(image_size=8, channels=1, ch=16, ch_mult="1,2", num_res=1, attn_res="", T=50,
                batch_size=8, warmup=1, update_every=2, queue_size=3, probe_batch=64, device="cpu",
                dataset="synthetic", workers=0)
TINY = ["--dataset", "synthetic", "--synthetic-n", "32", "--image-size", "8", "--ch", "16",
        "--ch-mult", "1,2", "--num-res", "1", "--attn-res=", "--T", "50", "--batch-size", "8",
        "--warmup", "1", "--update-every", "2", "--queue-size", "3", "--probe-batch", "64",
        "--log-every", "2", "--ckpt-every", "2", "--sample-every", "4", "--sample-n", "4",
        "--sample-steps", "3", "--workers", "0", "--device", "cpu", "--ema-decay", "0.9"]


def run(out_dir, *extra):
    """train.py on the toy setup; returns the checkpoint it left."""
    train.main([*TINY, "--out-dir", str(out_dir), *extra])
    return ats.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def log_records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def poison(monkeypatch, at_step, how):
    """Make Trainer.train_step damage the weights when it reaches `at_step`: 'nan' or 'huge'."""
    step = ats.Trainer.train_step

    def poisoned(self, x0):
        if self.step == at_step:
            with torch.no_grad():
                self.model.conv_out.weight.fill_(math.nan if how == "nan" else 1e6)
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", poisoned)


# -------------------------------------------------------------------------------------------------
# A stand-in for the Inception network, registered with torch-fidelity, so that FID and KID run
# their real code path offline and fast
# -------------------------------------------------------------------------------------------------

TEST_FEATURES = "ats-test-features"


def stand_in_features(x):
    """What the stand-in computes from uint8 (B, 3, H, W): per-channel means and stds on a 2x2
    grid, 24 numbers per image."""
    x = x.double() / 255
    cells = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)           # (B, 12)
    spread = torch.nn.functional.adaptive_avg_pool2d(x**2, 2).flatten(1) - cells**2
    return torch.cat([cells, spread.clamp(min=0).sqrt()], dim=1)              # (B, 24)


def use_stand_in_fid():
    """Register the stand-in with torch-fidelity; sample.FID then uses it."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class StandIn(torch_fidelity.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("24",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "24"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            return (stand_in_features(x).float(),)

    if TEST_FEATURES not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(TEST_FEATURES, StandIn)


@pytest.fixture
def stand_in_fid(monkeypatch, tmp_path):
    """sample.FID with the stand-in in place of Inception, torch-fidelity's cache in tmp_path."""
    pytest.importorskip("torch_fidelity")
    import sample
    use_stand_in_fid()
    monkeypatch.setattr(sample.FID, "feature_extractor", TEST_FEATURES)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def real_images(folder, n, size=8, seed=0, channels=1):
    """n PNGs of toy 'real' images (blobs) in folder, for an FID reference."""
    folder.mkdir(parents=True, exist_ok=True)
    x = (blobs(n, size, seed) + 1) / 2
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    import torchvision
    for i, img in enumerate(x):
        torchvision.utils.save_image(img, folder / f"real{i:04d}.png")
    return folder


def wait_for(path, seconds=120):
    """Wait until `path` exists (a background run has started writing), or fail."""
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


# -------------------------------------------------------------------------------------------------
# The README's copy block and the snippets that run on it
# -------------------------------------------------------------------------------------------------

COPY_FROM, COPY_TO = "# >>> ATS: copy from here.", "# <<< ATS: copy to here."


def copied_block():
    """ats.py from the copy-from marker to the copy-to marker, as a reader would paste it."""
    text = open(os.path.join(HERE, "ats.py")).read()
    assert text.count(COPY_FROM) == 1 and text.count(COPY_TO) == 1
    return text[text.index(COPY_FROM):text.index(COPY_TO)]


def readme_snippets():
    """The python blocks of the README's "ATS in your codebase", in order."""
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme[readme.index("## ATS in your codebase"):]
    section = section[:section.index("\n## ", 1)]
    assert COPY_FROM in section and COPY_TO in section
    return [part.split("```")[0] for part in section.split("```python")[1:]]


def copied():
    """The block, executed with exactly the imports its first lines list, and nothing else."""
    block = copied_block()
    header = block[:block.index("# 1.")]
    imports = [line.lstrip("# ").strip() for line in header.splitlines()
               if line.lstrip("# ").startswith("import ")]
    assert imports == ["import contextlib, math, warnings", "import torch",
                       "import torch.distributed as dist", "import torch.nn as nn",
                       "import torch.nn.functional as F"]
    scope = {}
    exec("\n".join(imports) + "\n" + block, scope)
    return scope
