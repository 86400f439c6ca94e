"""How far the ATS policy's first three updates move it on rewards that carry no information.

    python -m experiments.first_updates   # from the repository root; 48 s here, one thread

The policy starts uniform (its output layer is zero). Each update here is the sampler's own
REINFORCE step (`_learn`) on 64 digits, with rewards drawn as scale * N(0, 1): pure noise, so any
large move is the optimiser's, not the signal's. Printed per setting: the batch-mean KL(after ||
before) of updates 1, 2 and 3 for seeds 0 to 4, and how many of the policy's parameter tensors
moved by more than half the learning rate on average (the released settings: Adam, lr 1e-2).
"""

import torch

import ats
from experiments.variants import WarmupSampler

try:
    from sklearn.datasets import load_digits
except ImportError:
    raise SystemExit("error: this study needs scikit-learn: pip install scikit-learn") from None


def first_updates(images, seed, scale, lr=1e-2, warmup=0, init="zero", only_output=False,
                  updates=3, batch=64):
    """KL of each update, and the count of tensors that moved by > lr / 2 in each."""
    torch.manual_seed(seed)
    cls = WarmupSampler if warmup else ats.AdaptiveTimestepSampler
    sampler = cls(1000, None, in_channels=1, policy_lr=lr)
    sampler.warmup = warmup
    if init == "random":
        torch.nn.init.normal_(sampler.policy[-1].weight, std=1e-2)
    if only_output:
        sampler.opt = torch.optim.Adam(list(sampler.policy.parameters())[-2:], lr=lr)
    g = torch.Generator().manual_seed(seed)
    kls, moved = [], []
    for _ in range(updates):
        x0 = images[torch.randint(0, len(images), (batch,), generator=g)]
        t = sampler.sample(x0, generator=g)
        before = [p.detach().clone() for p in sampler.policy.parameters()]
        kls.append(sampler._learn(x0, t, scale * torch.randn(batch, generator=g))["kl_step"])
        moved.append(sum((p.detach() - b).abs().mean().item() > lr / 2
                         for p, b in zip(sampler.policy.parameters(), before)))
    return kls, moved


SETTINGS = [
    ("released, rewards 1e-4 (linear-like)", dict(scale=1e-4)),
    ("released, rewards 1e-2", dict(scale=1e-2)),
    ("released, rewards 3 (cosine-like)", dict(scale=3.0)),
    ("rewards 3, only the output layer trains", dict(scale=3.0, only_output=True)),
    ("rewards 3, random-init output layer", dict(scale=3.0, init="random")),
    ("rewards 1e-4, random-init output layer", dict(scale=1e-4, init="random")),
    ("rewards 3, policy lr 1e-3", dict(scale=3.0, lr=1e-3)),
    ("rewards 3, policy_warmup=10", dict(scale=3.0, warmup=10)),
]

if __name__ == "__main__":
    torch.set_num_threads(1)
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1
    for label, kw in SETTINGS:
        runs = [first_updates(digits, seed, **kw) for seed in range(5)]
        print(f"{label:42s} KL: " + "  ".join("/".join(f"{v:.3f}" for v in k) for k, _ in runs))
        print(f"{'':42s} moved: " + "  ".join("/".join(map(str, m)) for _, m in runs), flush=True)
