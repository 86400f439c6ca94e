"""The baselines ATS is compared with: loss weightings and timestep samplers, one block per paper.

A weighting is a float32 [T] tensor w_t that multiplies the per-sample L_simple (DDPM's eps
loss). A sampler has ats.py's sampler API (sample, weights, around_update, state_dict), so the
Trainer runs it as it runs ATS. train.py and the lab build both by name:

    weights = loss_weights("min-snr", diffusion.abar)     # or 'p2', 'speed', 'none' (None)
    sampler = make_sampler("lognormal", T, diffusion.abar)  # or 'speed', 'loss-second-moment', ...

Probability tables are float64 and sum to 1. SNR_t = abar_t / (1 - abar_t).
"""

import contextlib
import math

import torch

import ats


class TableSampler(ats.TimestepSampler):
    """t ~ p for a fixed table p [T]."""

    def __init__(self, p):
        super().__init__(len(p))
        self.p = p.double() / p.double().sum()

    def probs(self):
        return self.p

    def sample(self, x0, generator=None):
        p = self.probs().to(x0.device)
        return torch.multinomial(p, x0.shape[0], replacement=True, generator=generator)


def snr(abar):
    return abar.double() / (1 - abar.double())


# -------------------------------------------------------------------------------------------------
# Min-SNR-gamma weighting: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
# Strategy", arXiv:2303.09556. For eps-prediction: w_t = min(SNR_t, gamma) / SNR_t.
# -------------------------------------------------------------------------------------------------


def min_snr_weights(abar, gamma=5.0):
    s = snr(abar)
    return (s.clamp(max=gamma) / s).float()


# -------------------------------------------------------------------------------------------------
# P2 weighting: Choi et al. 2022, "Perception Prioritized Training of Diffusion Models",
# arXiv:2204.00227. w_t = 1 / (k + SNR_t)^gamma; k = gamma = 1 gives 1 - abar_t.
# -------------------------------------------------------------------------------------------------


def p2_weights(abar, k=1.0, gamma=1.0):
    return (1 / (k + snr(abar)) ** gamma).float()


# -------------------------------------------------------------------------------------------------
# Log-normal timesteps: Karras et al. 2022 (EDM), arXiv:2206.00364, Table 1:
# ln(sigma) ~ N(P_mean, P_std^2), with sigma_t = sqrt((1 - abar_t) / abar_t) on the discrete t.
# -------------------------------------------------------------------------------------------------


def lognormal_probs(abar, p_mean=-1.2, p_std=1.2):
    """t's bin runs between the midpoints of consecutive ln(sigma_t), the end bins take the tails,
    and p_t is the normal's mass in the bin: [T]."""
    log_sigma = 0.5 * ((1 - abar.double()) / abar.double()).log()     # increases with t
    edges = (log_sigma[1:] + log_sigma[:-1]) / 2                      # the T-1 bin edges
    cdf = torch.special.ndtr((edges - p_mean) / p_std)
    return torch.diff(cdf, prepend=cdf.new_zeros(1), append=cdf.new_ones(1))


# -------------------------------------------------------------------------------------------------
# SpeeD: Wang et al. 2024, "A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion
# Model Training", arXiv:2405.17403. Asymmetric sampling (p_t proportional to k below tau T, 1
# above) and a change-aware weighting, both as their code computes them. Their paired "dual" draw
# is not included: this is their `no_dual` ablation.
# -------------------------------------------------------------------------------------------------


def speed_probs(T, k=5.0, tau=0.7):
    p = torch.ones(T, dtype=torch.float64)
    p[:round(tau * T)] = k
    return p / p.sum()


def speed_weights(abar, lam=0.6, tau=0.7):
    """g_t = d(1 - abar_t)/dt, rescaled to [1 - lambda, lambda] below tau T, and 1 from there."""
    g = torch.gradient(1 - abar.double())[0]                          # how fast x_t changes with t
    w = (1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min())
    w[round(tau * len(abar)):] = 1
    return w.float()


# -------------------------------------------------------------------------------------------------
# Loss-second-moment resampling: Nichol & Dhariwal 2021, "Improved Denoising Diffusion
# Probabilistic Models", arXiv:2102.09672, Sec. 3.3 (improved-diffusion's resample.py).
# -------------------------------------------------------------------------------------------------


class LossSecondMomentSampler(TableSampler):
    """p_t proportional to the RMS of t's last `history` losses, unbiased by weights 1 / (T p_t).

    Uniform with weight 1 until every t has `history` losses, then mixed with `uniform_prob` of
    uniform. The losses are recorded before the update and gathered from every rank, so that all
    ranks hold the same history.
    """

    def __init__(self, T, history=10, uniform_prob=0.001):
        super().__init__(torch.ones(T))
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(T, history, dtype=torch.float64)     # newest last
        self.counts = torch.zeros(T, dtype=torch.long)

    def warm(self):
        return bool((self.counts >= self.losses.shape[1]).all())

    def probs(self):
        if not self.warm():
            return self.p
        rms = self.losses.square().mean(1).sqrt()                       # (T,)
        return (1 - self.uniform_prob) * rms / rms.sum() + self.uniform_prob / self.T

    def weights(self, t):
        if not self.warm():
            return super().weights(t)
        return (1 / (self.T * self.probs()[t.cpu()])).float().to(t.device)

    @contextlib.contextmanager
    def around_update(self, x0, t, losses=None):
        rank, size = ats.rank_and_size()
        gathered = torch.zeros(size, 2, len(t), dtype=torch.float64, device=t.device)
        gathered[rank] = torch.stack([t.double(), losses.double()])      # this rank's (t, loss)
        ts, ls = ats.all_reduce(gathered).transpose(0, 1).flatten(1).cpu()  # every rank's, in order
        for i, loss in zip(ts.long().tolist(), ls.tolist()):
            self.losses[i] = torch.cat([self.losses[i, 1:], self.losses.new_tensor([loss])])
            self.counts[i] += 1
        yield {}

    def state_dict(self):
        return {"losses": self.losses, "counts": self.counts}

    def load_state_dict(self, state):
        self.losses, self.counts = state["losses"].clone(), state["counts"].clone()


# -------------------------------------------------------------------------------------------------
# By name, for train.py and the lab
# -------------------------------------------------------------------------------------------------

SAMPLERS = ("uniform", "lognormal", "speed", "loss-second-moment")
WEIGHTINGS = ("none", "min-snr", "p2", "speed")


def make_sampler(name, T, abar, lognormal_mean=-1.2, lognormal_std=1.2):
    """A timestep sampler by name (ATS is built with its own arguments)."""
    if name == "uniform":
        return ats.UniformSampler(T)
    if name == "lognormal":
        finite = math.isfinite(lognormal_mean) and math.isfinite(lognormal_std)
        if not (finite and lognormal_std > 0):
            raise ValueError(f"lognormal_std must be positive and lognormal_mean finite, "
                             f"got {lognormal_std}, {lognormal_mean}")
        return TableSampler(lognormal_probs(abar, lognormal_mean, lognormal_std))
    if name == "speed":
        return TableSampler(speed_probs(T))
    if name == "loss-second-moment":
        return LossSecondMomentSampler(T)
    raise ValueError(f"unknown sampler {name!r}: use one of {SAMPLERS}")


def loss_weights(name, abar, snr_gamma=5.0):
    """Per-timestep weights w[t] on L_simple by name: float32 [T], or None for 'none'."""
    if name == "none":
        return None
    if name == "min-snr":
        if not (math.isfinite(snr_gamma) and snr_gamma > 0):
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        return min_snr_weights(abar, snr_gamma)
    if name == "p2":
        return p2_weights(abar)
    if name == "speed":
        return speed_weights(abar)
    raise ValueError(f"unknown weighting {name!r}: use one of {WEIGHTINGS}")
