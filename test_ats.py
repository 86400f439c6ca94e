"""Tests for ats.py, train.py, sample.py and bench.py. CPU only, a few minutes on 2 cores."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from PIL import Image

import ats
import bench
import sample
import train

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU OpenMP's spin-waits cost 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def linear_abar(T):
    """abar of DDPM's linear schedule, built here independently of the code under test (float64)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


def chi2_pvalue(t, p, min_expected=5.0):
    """Pearson chi-square p-value of draws t against probabilities p; cells expecting < min_expected pooled."""
    obs, exp = torch.bincount(t, minlength=len(p)).double(), t.numel() * p.double()
    small = exp < min_expected
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum(0, keepdim=True)])
        exp = torch.cat([exp[~small], exp[small].sum(0, keepdim=True)])
    return chi2_sf(((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1)


def ats_sampler(T, model, diffusion, **kw):
    return ats.AdaptiveTimestepSampler(T, lambda x0, t, n: diffusion.vlb_terms(model, x0, t, n), in_channels=1,
                                       model=model, **kw)


def set_ab(sampler, a, b):
    """Make the policy output (a, b) for every image: zero last-layer weights, bias = softplus^-1."""
    last = sampler.policy[-1]
    with torch.no_grad():
        last.weight.zero_()
        y = torch.tensor([a, b], dtype=torch.float64) - 1e-5
        last.bias.copy_((y + (-(-y).expm1()).log()).float())  # softplus^-1(y), stable for large y


def chi2_sf(stat, df):
    """Survival function of the chi-square distribution."""
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


class Oracle(nn.Module):
    """An eps-model that returns the true noise."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, xt, t):
        return self.noise


# ---------------------------------------------------------------------------------------------
# schedules, q_sample and VLB math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "quad", "cosine"])
def test_schedule_abar_monotone_in_unit_interval(schedule):
    """abar_t lies in (0, 1) and strictly decreases for every schedule."""
    abar = ats.GaussianDiffusion(T=1000, schedule=schedule).abar
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_unknown_schedule_and_variance_are_refused():
    """A bad schedule or variance name raises one ValueError naming the choices."""
    with pytest.raises(ValueError, match="linear"):
        ats.GaussianDiffusion(schedule="sigmoid")
    with pytest.raises(ValueError, match="large"):
        ats.GaussianDiffusion(var_type="learned")


def test_q_sample_moments_match_theory():
    """q(x_t | x0) has mean sqrt(abar_t) x0 and variance 1 - abar_t."""
    d = ats.GaussianDiffusion(T=1000, schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t in (0, 300, 999):
        tt = torch.full((len(x0),), t)
        xt = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        assert xt.mean().item() == pytest.approx(0.7 * d.abar[t].sqrt().item(), abs=0.01)
        assert xt.var().item() == pytest.approx(1 - d.abar[t].item(), abs=0.01)


def test_oracle_model_has_zero_kl_with_small_variance():
    """With 'small' variance a model that predicts the true noise has L_t = 0 for every t >= 1."""
    d = ats.GaussianDiffusion(T=1000, schedule="linear", var_type="small")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    for t in (1, 2, 50, 500, 999):
        kl = d.vlb_terms(Oracle(noise), x0, torch.full((8,), t), noise)
        assert kl.abs().max().item() < 1e-5


def test_vlb_terms_match_closed_form_on_one_pixel():
    """L_t and L_0 equal an independent float64 computation from the DDPM formulas."""
    T = 10
    d = ats.GaussianDiffusion(T=T, schedule="linear", var_type="large")
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar = [math.prod(1 - b for b in betas[: i + 1]) for i in range(T)]
    x0, eps, eps_model = 0.3, -0.8, 0.5

    class Const(nn.Module):
        def forward(self, xt, t):
            return torch.full_like(xt, eps_model)

    for t in (0, 1, 5, 9):
        ab, ab_prev, beta = abar[t], (abar[t - 1] if t else 1.0), betas[t]
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        c1, c2 = beta * math.sqrt(ab_prev) / (1 - ab), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        x0_hat = (xt - math.sqrt(1 - ab) * eps_model) / math.sqrt(ab)
        mu_q, mu_p = c1 * x0 + c2 * xt, c1 * x0_hat + c2 * xt
        var_q = beta * (1 - ab_prev) / (1 - ab)
        var_p = betas[t] if t else betas[1] * (1 - abar[0]) / (1 - abar[1])  # 'large', var_post[1] at t = 0
        if t == 0:
            sd = math.sqrt(2 * var_p)
            mass = 0.5 * (math.erf((x0 - mu_p + 1 / 255) / sd) - math.erf((x0 - mu_p - 1 / 255) / sd))
            expected = -math.log(mass) / math.log(2)
        else:
            expected = 0.5 * (math.log(var_p / var_q) + var_q / var_p + (mu_q - mu_p) ** 2 / var_p - 1) / math.log(2)
        got = d.vlb_terms(Const(), torch.full((1, 1, 1, 1), x0), torch.tensor([t]), torch.full((1, 1, 1, 1), eps))
        assert got.item() == pytest.approx(expected, rel=1e-3, abs=1e-6), t


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_prior_term_is_negligible(schedule):
    """KL(q(x_T | x0) || N(0, I)) is below 1e-4 bits/dim at T = 1000 for data in [-1, 1]."""
    d = ats.GaussianDiffusion(T=1000, schedule=schedule)
    x0 = torch.tensor([-1.0, -0.3, 0.0, 1.0]).view(4, 1, 1, 1)
    assert d.prior_bpd(x0).max().item() < 1e-4


def test_nll_bpd_is_sum_of_terms_and_chunk_independent():
    """nll_bpd equals prior + sum_t L_t, whatever the chunk size."""
    d = ats.GaussianDiffusion(T=20, schedule="linear")
    model = tiny_unet().eval()
    x0 = blobs(3)
    a = d.nll_bpd(model, x0, batch_size=7, generator=torch.Generator().manual_seed(0))
    b = d.nll_bpd(model, x0, batch_size=60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    noise = torch.randn((3 * 20, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    terms = d.vlb_terms(model, x0.repeat_interleave(20, 0), torch.arange(20).repeat(3), noise).view(3, 20)
    torch.testing.assert_close(a, terms.sum(1) + d.prior_bpd(x0))


# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c, size", [(1, 8), (3, 16), (3, 32)])
def test_unet_shapes(c, size):
    """The U-Net maps (B, C, H, W) to (B, C, H, W) for several channel counts and sizes."""
    model = ats.UNet(in_ch=c, ch=32, ch_mult=(1, 2, 2), num_res=1, attn_res=(size // 2,), image_size=size)
    x = torch.randn(2, c, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_cifar10_unet_has_ddpm_size():
    """The CIFAR-10 configuration has exactly the DDPM model's 35,746,307 parameters, and rebuilds from its config."""
    model = ats.UNet()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert ats.UNet(**model.config).config == model.config


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_without_autocast_is_exactly_f_group_norm(layout):
    """With autocast off, the U-Net's GroupNorm equals F.group_norm bitwise, for both memory layouts."""
    torch.manual_seed(0)
    norm = ats.norm(64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(4, 64, 8, 8).contiguous(memory_format=layout)
    assert torch.equal(norm(x), torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, norm.eps))


def test_group_norm_under_autocast_keeps_dtype_and_layout():
    """Under bf16 autocast the norm returns bf16 in the input's layout, matching the fp32 norm to bf16 precision."""
    torch.manual_seed(0)
    norm = ats.norm(64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(4, 64, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=2e-2)


def test_attention_equals_the_math_by_hand():
    """The 4-D SDPA attention block equals softmax(q k^T / sqrt(C)) v + proj, computed by hand in float64."""
    torch.manual_seed(0)
    attn = ats.Attention(16)
    with torch.no_grad():
        attn.proj.weight.normal_(0, 0.3)
    x = torch.randn(2, 16, 4, 4)
    h = attn.norm(x).double()
    qkv = torch.einsum("oc,bchw->bohw", attn.qkv.weight[:, :, 0, 0].double(), h) + attn.qkv.bias.double()[:, None, None]
    q, k, v = qkv.flatten(2).chunk(3, dim=1)                                    # (B, C, HW) each
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 4.0, dim=-1)         # sqrt(16) = 4
    out = torch.einsum("bij,bcj->bci", w, v).view(2, 16, 4, 4)
    expected = x.double() + torch.einsum("oc,bchw->bohw", attn.proj.weight[:, :, 0, 0].double(), out) \
        + attn.proj.bias.double()[:, None, None]
    torch.testing.assert_close(attn(x).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the adaptive sampler: probabilities
# ---------------------------------------------------------------------------------------------


def test_probabilities_normalised_for_extreme_ab():
    """For (a, b) over [1e-3, 1e3], extremes included, pi is finite, >= 0, sums to 1; log-pi and H are finite."""
    s = ats.AdaptiveTimestepSampler(1000, vlb_fn=None)
    g = torch.Generator().manual_seed(0)
    ab = 10 ** (torch.rand(2, 2000, generator=g) * 6 - 3)
    corners = torch.tensor([[1e-3, 1e-3, 1e3, 1e3], [1e-3, 1e3, 1e-3, 1e3]])
    a, b = torch.cat([ab, corners], dim=1)
    logp = s.log_probs_from_ab(a, b)
    p = logp.exp()
    entropy = -(p * logp).sum(1)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (p >= 0).all()
    assert (p.double().sum(1) - 1).abs().max().item() < 1e-6


def test_policy_starts_exactly_uniform():
    """At initialisation a = b = 1 and every timestep has probability exactly 1/T."""
    s = ats.AdaptiveTimestepSampler(1000, vlb_fn=None, in_channels=3)
    p = s.probs(torch.randn(4, 3, 32, 32))
    assert (p == p[0, 0]).all()
    assert p[0, 0].item() == pytest.approx(1 / 1000, rel=1e-6)


def test_policy_works_for_any_size_and_channels():
    """The policy network accepts 1- and 3-channel images from 4x4 to 64x64."""
    for c, size in [(1, 4), (1, 8), (3, 32), (3, 64)]:
        s = ats.AdaptiveTimestepSampler(50, vlb_fn=None, in_channels=c)
        assert s.probs(torch.randn(2, c, size, size)).shape == (2, 50)


def test_sampling_matches_stated_probabilities():
    """100k draws at fixed (a, b) pass a chi-square test against pi, at p > 1e-3."""
    T, n = 20, 100_000
    s = ats.AdaptiveTimestepSampler(T, vlb_fn=None, in_channels=1)
    set_ab(s, 2.0, 5.0)
    x0 = torch.zeros(n, 1, 2, 2)
    t = s.sample(x0, generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(t, s.probs(x0[:1])[0]) > 1e-3


def test_log_prob_of_sample_and_seeded_draws():
    """log pi(t | x0) at a sampled t equals log p[t]; the same seed gives the same draws."""
    s = ats.AdaptiveTimestepSampler(100, vlb_fn=None, in_channels=1)
    set_ab(s, 0.5, 3.0)
    x0 = torch.randn(64, 1, 8, 8)
    t1 = s.sample(x0, generator=torch.Generator().manual_seed(7))
    t2 = s.sample(x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t1, t2)
    logp = s.log_probs(x0).gather(1, t1[:, None]).squeeze(1)
    torch.testing.assert_close(logp.exp(), s.probs(x0).gather(1, t1[:, None]).squeeze(1))


def test_uniform_sampler_api():
    """UniformSampler draws in [0, T), is seeded, weighs every sample 1, and its update hook is a no-op."""
    s = ats.UniformSampler(10)
    x0 = torch.zeros(1000, 1, 2, 2)
    t = s.sample(x0, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 10 and len(t.unique()) == 10
    assert torch.equal(t, s.sample(x0, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(s.weights(t), torch.ones(1000))
    with s.around_update(x0, t) as stats:
        ran = True
    assert ran and stats == {} and s.state_dict() == {}


# ---------------------------------------------------------------------------------------------
# the adaptive sampler: the policy objective (the released code's, discretised)
# ---------------------------------------------------------------------------------------------


def test_reinforce_moves_mass_toward_rewarded_timesteps():
    """REINFORCE with a reward that favours small t moves mass into the first quarter of [0, T)."""
    torch.manual_seed(0)
    T = 100
    s = ats.AdaptiveTimestepSampler(T, vlb_fn=None, in_channels=1, policy_lr=1e-2)
    x0 = torch.randn(32, 1, 8, 8)
    first_quarter = lambda: s.probs(x0)[:, : T // 4].sum(1).mean().item()
    start = first_quarter()
    for _ in range(200):
        t = s.sample(x0)
        s._learn(x0, t, reward=(t < T // 4).float())
    assert start == pytest.approx(0.25, abs=0.01)
    assert first_quarter() > 0.5


def test_zero_reward_leaves_a_uniform_policy_exactly_uniform():
    """With a constant-zero reward the released objective's gradient at uniform is exactly 0: nothing moves."""
    torch.manual_seed(0)
    s = ats.AdaptiveTimestepSampler(100, vlb_fn=None, in_channels=1)
    before = {k: v.clone() for k, v in s.policy.state_dict().items()}
    x0 = torch.randn(16, 1, 8, 8)
    for _ in range(5):
        s._learn(x0, s.sample(x0), reward=torch.zeros(16))
    assert all(p.grad is None or (p.grad == 0).all() for p in s.policy.parameters())
    assert all(torch.equal(before[k], v) for k, v in s.policy.state_dict().items())


def entropy_gradient(sampler, delta, T=200):
    """d loss / d (a's bias) at a = 1 + delta, b = 1, zero reward, averaged over every t."""
    set_ab(sampler, 1 + delta, 1.0)
    sampler.policy.zero_grad()
    logp = sampler.log_probs(torch.zeros(1, 1, 4, 4)).expand(T, T)
    sampler.policy_loss(logp, torch.arange(T), torch.zeros(T)).backward()
    return sampler.policy[-1].bias.grad[0].abs().item()


def test_entropy_term_acts_faster_than_linearly_near_uniform():
    """Near uniform the released objective's entropy gradient shrinks ~delta^3 (a separate bonus: ~delta)."""
    released = ats.AdaptiveTimestepSampler(200, vlb_fn=None, in_channels=1)
    ratio = entropy_gradient(released, 0.02) / entropy_gradient(released, 0.04)
    assert ratio < 0.2  # cubic gives 1/8, linear 1/2
    bonus = bench.BonusEntropySampler(200, vlb_fn=None, in_channels=1)
    assert entropy_gradient(bonus, 0.02) / entropy_gradient(bonus, 0.04) > 0.4  # the test tells the two apart
    assert entropy_gradient(released, 0.02) < 0.01 * entropy_gradient(bonus, 0.02)


def test_probe_is_clean_without_an_update():
    """With dropout on and no model change between the probes, every delta and reward is exactly 0."""
    torch.manual_seed(0)
    d = ats.GaussianDiffusion(T=30)
    model = tiny_unet(dropout=0.5).train()
    s = ats_sampler(30, model, d)
    rewards = []
    learn = s._learn
    s._learn = lambda x0, t, r: (rewards.append(r), learn(x0, t, r))[1]
    x0 = blobs(8)
    with s.around_update(x0, s.sample(x0)) as stats:
        pass
    assert model.training  # restored after the probe
    assert torch.equal(s.queue_x[-1], torch.zeros(30, dtype=torch.float64))
    assert torch.equal(rewards[0], torch.zeros(8)) and stats["reward"] == 0


def test_probe_sees_a_real_update():
    """With an optimizer step between the probes, the sweep deltas and rewards are non-zero."""
    torch.manual_seed(0)
    d = ats.GaussianDiffusion(T=30)
    model = tiny_unet(dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s = ats_sampler(30, model, d)
    rewards = []
    learn = s._learn
    s._learn = lambda x0, t, r: (rewards.append(r), learn(x0, t, r))[1]
    x0 = blobs(8)
    t = s.sample(x0)
    d.loss(model, x0, t).mean().backward()
    with s.around_update(x0, t) as stats:
        opt.step()
    assert (s.queue_x[-1] != 0).sum() > 25
    assert (rewards[0] != 0).all()
    assert stats["p"].shape == (30,) and stats["S"] == [0, 1, 2]


def test_update_runs_every_f_s_global_steps():
    """The probe and policy step run exactly at global steps 0, f_S, 2 f_S, ...; S is updated from 3 rows on."""
    d = ats.GaussianDiffusion(T=20)
    model = tiny_unet()
    s = ats_sampler(20, model, d, update_every=4, num_selected=2)
    x0 = blobs(4)
    updated = []
    for step in range(13):
        with s.around_update(x0, s.sample(x0)) as stats:
            pass
        updated += [step] if stats else []
    assert s.step == 13 and len(s.queue_y) == 4 and updated == [0, 4, 8, 12]


def test_f_scores_recover_planted_timesteps():
    """With y driven by 3 known timesteps plus noise, F-score selection picks exactly those 3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 200, generator=g, dtype=torch.float64)
    X[:, 50] = 0.0  # a constant column must score 0
    y = 3 * X[:, 7] - 2 * X[:, 120] + 2.5 * X[:, 199] + 0.1 * torch.randn(100, generator=g, dtype=torch.float64)
    scores = ats.AdaptiveTimestepSampler.f_scores(X, y)
    assert scores[50] == 0
    assert sorted(scores.topk(3).indices.tolist()) == [7, 120, 199]


def test_queue_is_fifo_and_selects_planted_timesteps():
    """The queue keeps the last Q sweeps, and S becomes the planted timesteps."""
    s = ats.AdaptiveTimestepSampler(50, vlb_fn=None, queue_size=5, num_selected=2)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        delta = 0.01 * torch.randn(50, generator=g, dtype=torch.float64)
        delta[[11, 42]] += 10 * torch.randn(1, generator=g, dtype=torch.float64)
        s._push_queue(delta)
        assert s.S.tolist() == ([0, 1] if i < 2 else [11, 42])  # S = {0..|S|-1} until 3 rows
    assert len(s.queue_y) == 5 and torch.equal(s.queue_x[-1], delta)


# ---------------------------------------------------------------------------------------------
# the heuristics: loss weightings and table samplers, checked against float64 values computed here
# ---------------------------------------------------------------------------------------------


def test_min_snr_weights():
    """Min-SNR weights are min(SNR, 5)/SNR; on linear T=1000 they are exactly 1 from t=130 on, w[0] ~ 5.0e-4."""
    abar = linear_abar(1000)
    snr = abar / (1 - abar)
    w = ats.loss_weights("min-snr", abar)
    torch.testing.assert_close(w.double(), snr.clamp(max=5.0) / snr, rtol=1e-6, atol=0)
    assert (w[130:] == 1).all() and (w[:130] < 1).all()
    assert w[0].item() == pytest.approx(5 * 1e-4 / (1 - 1e-4), rel=1e-5)


def test_min_snr_equals_x0_space_loss():
    """w_t ||eps - eps_hat||^2 equals min(SNR_t, gamma) ||x0 - x0_hat||^2 for x0_hat derived from eps_hat."""
    abar, g = linear_abar(1000), torch.Generator().manual_seed(0)
    t = torch.arange(0, 1000, 37)
    x0, eps, eps_hat = (torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    a = abar[t].view(-1, 1, 1, 1)
    x0_hat = (a.sqrt() * x0 + (1 - a).sqrt() * eps - (1 - a).sqrt() * eps_hat) / a.sqrt()
    lhs = ats.loss_weights("min-snr", abar).double()[t] * ((eps - eps_hat) ** 2).flatten(1).mean(1)
    rhs = (abar[t] / (1 - abar[t])).clamp(max=5.0) * ((x0 - x0_hat) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0)


def test_p2_and_speed_weights():
    """P2 with k = gamma = 1 is 1 - abar_t; SpeeD's weight rescales d(1 - abar)/dt to [0.4, 0.6] below 700, 1 above."""
    abar = linear_abar(1000)
    torch.testing.assert_close(ats.loss_weights("p2", abar), (1 - abar).float())
    f = 1 - abar
    g = torch.cat([f[1:2] - f[:1], (f[2:] - f[:-2]) / 2, f[-1:] - f[-2:-1]])   # np.gradient, by hand
    expected = 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min())
    expected[700:] = 1
    torch.testing.assert_close(ats.loss_weights("speed", abar), expected.float())
    assert ats.loss_weights("none", abar) is None
    with pytest.raises(ValueError, match="min-snr"):
        ats.loss_weights("snr+1", abar)


def test_lognormal_table():
    """Log-normal probabilities are >= 0, sum to 1, and the bin holding exp(P_mean) straddles the CDF's 0.5."""
    abar = linear_abar(1000)
    p = ats.lognormal_probs(abar, -1.2, 1.2)
    assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-12
    sigma = ((1 - abar) / abar).sqrt()
    t = int((sigma.log() + 1.2).abs().argmin())                                # the bin of sigma = exp(P_mean)
    assert p[:t].sum() <= 0.5 <= p[: t + 1].sum()


def test_speed_table():
    """SpeeD's table puts k = 5 times the mass on t < 700 as on t >= 700 and sums to 1."""
    p = ats.speed_probs(1000)
    assert abs(p.sum().item() - 1) < 1e-12 and (p[:700] == 5 * p[700]).all() and (p[700:] == p[700]).all()


def warm_lsm(T=20, history=10):
    """A LossSecondMomentSampler fed `history` losses for every t, and those losses [T, history]."""
    s = ats.LossSecondMomentSampler(T, history=history)
    t = torch.arange(T).repeat(history)
    noise = torch.rand(len(t), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses = (t.double() + 1) * (0.5 + noise)
    with s.around_update(None, t, losses):
        pass
    return s, losses.view(history, T).T


@pytest.mark.parametrize("name", ["uniform", "lognormal", "speed", "loss-second-moment"])
def test_table_samplers_match_their_probabilities(name):
    """Seeded draws of every heuristic sampler pass a chi-square test against its stated probabilities."""
    T = 20
    s = warm_lsm(T)[0] if name == "loss-second-moment" else ats.make_sampler(name, T, linear_abar(1000)[::50])
    t = s.sample(torch.zeros(20_000, 1), generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(t, s.probs()) > 1e-3


def test_loss_second_moment_sampler():
    """Uniform with weight 1 before warm-up; then p = (1-u) L_t / sum L + u/T for constant losses, and unbiased."""
    T, u = 20, 0.001
    s = ats.LossSecondMomentSampler(T, history=3, uniform_prob=u)
    L = torch.arange(1, T + 1, dtype=torch.float64)
    for _ in range(3):
        assert torch.equal(s.probs(), torch.full((T,), 1 / T, dtype=torch.float64))
        assert torch.equal(s.weights(torch.arange(T)), torch.ones(T))
        with s.around_update(None, torch.arange(T), L):
            pass
    p = s.probs()
    torch.testing.assert_close(p, (1 - u) * L / L.sum() + u / T)
    w = s.weights(torch.arange(T)).double()
    torch.testing.assert_close((p * w * L).sum(), L.mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["uniform", "lognormal", "speed", "loss-second-moment"])
def test_heuristic_samplers_resume_exactly(name, tmp_path):
    """A sampler restored from a saved state draws exactly what the uninterrupted one draws."""
    make = lambda: ats.make_sampler(name, 20, linear_abar(1000)[::50])
    g = torch.Generator().manual_seed(0)
    a, x0 = make(), torch.zeros(32, 1)
    for _ in range(8):
        with a.around_update(x0, a.sample(x0, g), torch.rand(32, generator=g, dtype=torch.float64)):
            pass
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = make()
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for _ in range(16):
        losses = torch.rand(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        ta, tb = (s.sample(x0, torch.Generator().manual_seed(seed)) for s in (a, b))
        assert torch.equal(ta, tb) and torch.equal(a.weights(ta), b.weights(tb))
        for s, t in ((a, ta), (b, tb)):
            with s.around_update(x0, t, losses):
                pass
    assert name != "loss-second-moment" or b.warm()  # the table changed after the resume


# ---------------------------------------------------------------------------------------------
# training, checkpoints, sampling
# ---------------------------------------------------------------------------------------------


def make_trainer(sampler="ats", seed=0, T=50, **kw):
    torch.manual_seed(seed)
    model = tiny_unet()
    d = ats.GaussianDiffusion(T=T)
    s = ats_sampler(T, model, d, update_every=3, seed=seed) if sampler == "ats" else ats.UniformSampler(T)
    return ats.Trainer(model, d, s, lr=2e-3, warmup=5, ema_decay=0.9, seed=seed, **kw)


def batches(data, batch, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(0, len(data), (batch,), generator=g)]


def test_training_lowers_the_loss():
    """About 100 steps on a small generated dataset lower the average loss."""
    trainer = make_trainer("ats")
    losses = [loss.item() for loss in trainer.run(batches(blobs(256), 32, 0), 120)]
    assert trainer.step == 120 and len(losses) == 120
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_uniform_unweighted_step_is_the_plain_ddpm_step():
    """Uniform t with no weighting trains bit-identically to a hand-written DDPM step (Adam, clip, EMA)."""
    trainer = make_trainer("uniform")
    torch.manual_seed(0)
    model, d = tiny_unet(), ats.GaussianDiffusion(T=50)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    ema = [p.detach().clone() for p in model.parameters()]
    gen, data = torch.Generator().manual_seed(0), blobs(64)
    for i, x0 in zip(range(6), batches(data, 8, 0)):
        trainer.train_step(x0)
        t = torch.randint(0, 50, (8,), generator=gen)
        loss = d.loss(model, x0, t, torch.randn(x0.shape, generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (i + 1) / 5)
        opt.step()
        ema = [p.detach().clone() if i == 0 else e.lerp(p.detach(), 0.1) for e, p in zip(ema, model.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema.parameters(), ema))


def test_ema_equals_averaged_model_bitwise():
    """The sync-free EMA equals torch's AveragedModel EMA bitwise over 20 steps."""
    trainer = make_trainer("uniform")
    reference = torch.optim.swa_utils.AveragedModel(
        trainer.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    for _, x0 in zip(range(20), batches(blobs(64), 8, 0)):
        trainer.train_step(x0)
        reference.update_parameters(trainer.model)
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema.parameters(), reference.module.parameters()))


def test_fused_adam_matches_foreach():
    """Fused Adam (the CUDA default) gives foreach Adam's weights to rtol 1e-6, where this CPU build has it.

    A small conv net with ordinary gradients: where a gradient is near 0 (the U-Net's zero-initialised
    layers at step 1), Adam divides rounding noise by sqrt(v) + eps and the two differ by up to a whole step.
    """
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))
        try:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
        except RuntimeError as e:
            pytest.skip(f"fused Adam is not available on this CPU build: {e}")
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            x = torch.randn(8, 1, 8, 8, generator=g)
            opt.zero_grad()
            (model(x) - x).square().mean().backward()
            opt.step()
        runs.append(list(model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(*runs))


@pytest.mark.parametrize("sampler, weighting", [("ats", "none"), ("uniform", "min-snr"), ("lognormal", "p2"),
                                                ("speed", "speed"), ("loss-second-moment", "none")])
def test_every_sampler_and_weighting_trains_under_bf16(sampler, weighting):
    """Each sampler and weighting takes finite bf16-autocast steps on CPU; the logged loss is the unweighted one."""
    cfg = train.Config(**{**TINY_CFG, "sampler": sampler, "weighting": weighting, "amp": "bf16"})
    trainer = train.build(cfg, torch.device("cpu"))
    assert trainer.amp_dtype == torch.bfloat16
    for loss in trainer.run(batches(blobs(32), 8, 0), 3):
        assert torch.isfinite(loss)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    """save_checkpoint then load restores model, EMA, optimizers, sampler, generator, step; UNet rebuilds from it."""
    trainer = make_trainer("ats")
    list(trainer.run(batches(blobs(64), 8, 0), 7))
    path = tmp_path / "ckpt.pt"
    ats.save_checkpoint(path, trainer, {"lr": 2e-3})
    ckpt = ats.load_checkpoint(path)
    assert ckpt["config"] == {"lr": 2e-3} and ckpt["step"] == 7 and not (tmp_path / "ckpt.pt.tmp").exists()
    fresh = make_trainer("ats", seed=1)
    fresh.load_state_dict(ckpt)
    pairs = [(trainer.model, fresh.model), (trainer.ema, fresh.ema), (trainer.sampler.policy, fresh.sampler.policy)]
    for a, b in pairs:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert torch.equal(fresh.sampler.queue_x, trainer.sampler.queue_x)
    assert torch.equal(fresh.sampler.S, trainer.sampler.S) and fresh.sampler.step == trainer.sampler.step
    assert fresh.sched.get_last_lr() == trainer.sched.get_last_lr() and fresh.step == 7
    assert torch.equal(fresh.generator.get_state(), trainer.generator.get_state())
    model, diffusion = ats.load_model(ckpt, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trainer.ema.parameters()))
    assert diffusion.T == 50 and not model.training


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Stopping at step 10, saving and resuming gives bit-identical weights at step 20 on CPU."""
    data = blobs(64)
    straight = make_trainer("ats")
    list(straight.run(batches(data, 8, 0), 20))
    first = make_trainer("ats")
    stream = batches(data, 8, 0)
    list(first.run(stream, 10))
    ats.save_checkpoint(tmp_path / "ckpt.pt", first, {})
    ckpt = ats.load_checkpoint(tmp_path / "ckpt.pt")
    second = make_trainer("ats", seed=5)
    second.load_state_dict(ckpt)
    ats.set_rng_state(ckpt["rng"])
    list(second.run(stream, 20))
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.sampler.policy.parameters(), second.sampler.policy.parameters()):
        assert torch.equal(a, b)


def test_learning_rates_given_on_resume_apply():
    """A trainer built with new learning rates keeps them after loading a state saved with other rates."""
    old = make_trainer("ats")
    list(old.run(batches(blobs(64), 8, 0), 3))
    state = old.state_dict()
    torch.manual_seed(0)
    model, d = tiny_unet(), ats.GaussianDiffusion(T=50)
    new = ats.Trainer(model, d, ats_sampler(50, model, d, update_every=3, policy_lr=0.5), lr=0.25, warmup=5)
    new.load_state_dict(state)
    assert new.opt.param_groups[0]["lr"] == pytest.approx(0.25 * 4 / 5) and new.sched.base_lrs == [0.25]
    assert new.sampler.opt.param_groups[0]["lr"] == 0.5
    new.train_step(blobs(8))
    assert new.opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_bad_checkpoint_files_give_one_clear_error(tmp_path):
    """Missing, truncated, foreign and old-version files each raise CheckpointError naming the problem."""
    with pytest.raises(ats.CheckpointError, match="no checkpoint"):
        ats.load_checkpoint(tmp_path / "missing.pt")
    trainer = make_trainer("uniform")
    ats.save_checkpoint(tmp_path / "good.pt", trainer, {})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ats.CheckpointError, match="truncated or corrupt"):
        ats.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ats.CheckpointError, match="not an ats checkpoint"):
        ats.load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ats.CheckpointError, match="truncated or corrupt"):
        ats.load_checkpoint(tmp_path / "text.pt")
    torch.save({"format": "ats-checkpoint", "version": 1, "model": {}}, tmp_path / "v1.pt")
    with pytest.raises(ats.CheckpointError, match="version 1, this code reads version 2"):
        ats.load_checkpoint(tmp_path / "v1.pt")


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_shape_range_and_determinism(method):
    """DDPM and DDIM return the right shape and range, the same images under the same seed, and an image's
    noise depends on its own generator only, not on the batch it is in."""
    torch.manual_seed(0)
    d = ats.GaussianDiffusion(T=40)
    model = tiny_unet().eval()
    with torch.no_grad():  # a non-trivial output layer, so samples are not just noise
        model.conv_out.weight.normal_(0, 0.3)
    draw = (lambda g, n=3: d.ddpm_sample(model, (n, 1, 8, 8), generator=g)) if method == "ddpm" else \
        (lambda g, n=3: d.ddim_sample(model, (n, 1, 8, 8), steps=10, eta=0.5, generator=g))
    x = draw(torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, draw(torch.Generator().manual_seed(1)))
    assert not torch.equal(x, draw(torch.Generator().manual_seed(2)))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together, apart = draw(gens([5, 6, 7])), torch.cat([draw(gens([5, 6]), 2), draw(gens([7]), 1)])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# several processes (gloo on CPU)
# ---------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_setup(T):
    torch.manual_seed(0)
    model = tiny_unet().eval()
    d = ats.GaussianDiffusion(T=T)
    s = ats_sampler(T, model, d)
    g = torch.Generator().manual_seed(1)
    return s, blobs(1), torch.randn((T, 1, 8, 8), generator=g)


def _sweep_worker(rank, world, port, T, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, x_star, noise = sweep_setup(T)
        sweep = s.sweep(x_star, noise)
        if rank == 0:
            torch.save(sweep, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("T, world", [(7, 2), (10, 3)])
def test_split_sweep_equals_single_process_sweep(tmp_path, T, world):
    """The T-sweep split over ranks (T not divisible by the world size) and summed equals one process's."""
    out = tmp_path / "sweep.pt"
    mp.spawn(_sweep_worker, args=(world, free_port(), T, str(out)), nprocs=world)
    s, x_star, noise = sweep_setup(T)
    torch.testing.assert_close(torch.load(out), s.sweep(x_star, noise), rtol=1e-5, atol=1e-7)  # batch-size rounding


def _lsm_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = ats.LossSecondMomentSampler(10, history=3)
        for step in range(4):
            g = torch.Generator().manual_seed(100 * rank + step)
            with s.around_update(None, torch.randint(0, 10, (6,), generator=g), torch.rand(6, generator=g) + rank):
                pass
        torch.save(s.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_loss_second_moment_histories_agree_across_ranks(tmp_path):
    """Two gloo ranks fed different losses hold one history: every rank's losses, in rank order."""
    mp.spawn(_lsm_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = ats.LossSecondMomentSampler(10, history=3)
    for step in range(4):
        gens = [torch.Generator().manual_seed(100 * r + step) for r in range(2)]
        draws = [(torch.randint(0, 10, (6,), generator=g), torch.rand(6, generator=g) + r) for r, g in enumerate(gens)]
        with reference.around_update(None, torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])):
            pass
    for state in states:
        assert torch.equal(state["losses"], reference.losses) and torch.equal(state["counts"], reference.counts)


# ---------------------------------------------------------------------------------------------
# train.py and sample.py
# ---------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CFG = dict(image_size=8, channels=1, ch=16, ch_mult="1,2", num_res=1, attn_res="", T=50, batch_size=8, warmup=1,
                update_every=2, queue_size=3, probe_batch=64, device="cpu", dataset="synthetic", workers=0)
TINY = ["--dataset", "synthetic", "--synthetic-n", "32", "--image-size", "8", "--ch", "16", "--ch-mult", "1,2",
        "--num-res", "1", "--attn-res=", "--T", "50", "--batch-size", "8", "--warmup", "1", "--update-every", "2",
        "--queue-size", "3", "--probe-batch", "64", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "4",
        "--sample-n", "4", "--sample-steps", "3", "--workers", "0", "--device", "cpu", "--ema-decay", "0.9"]


def run(out_dir, *extra):
    train.main([*TINY, "--out-dir", str(out_dir), *extra])
    return ats.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def log_records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def assert_same_state(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["sampler"], b["sampler"]
    for name in sa["policy"]:
        assert torch.equal(sa["policy"][name], sb["policy"][name]), f"policy.{name} differs"
    assert torch.equal(sa["S"], sb["S"]) and torch.equal(sa["queue_x"], sb["queue_x"])
    assert sa["step"] == sb["step"] and a["step"] == b["step"]


def test_train_writes_outputs_and_sample_generates(tmp_path):
    """A short tiny run writes ckpt, grid, log, heatmap, config; sample.py makes a grid and extends a folder."""
    out = tmp_path / "run"
    ckpt = run(out, "--steps", "4")
    assert ckpt["step"] == 4 and ckpt["config"]["ch"] == 16 and ckpt["unet"]["ch"] == 16
    for name in ("ckpt.pt", "grid_0000004.png", "log.jsonl", "sampler.png", "config.json"):
        assert (out / name).is_file(), name
    records = log_records(out)
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "img_per_s", "sampler"} <= set(records[-1]) and "quarters" in records[-1]["sampler"]
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert Image.open(out / "sampler.png").size == (50, 256)  # (T, --heatmap-height)
    grid, folder = tmp_path / "grid.png", tmp_path / "imgs"
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--n", "3", "--batch-size", "2", "--steps", "3",
                 "--grid", str(grid), "--out-dir", str(folder)])
    assert grid.is_file() and sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png", "samples.json"]
    assert Image.open(folder / "000000.png").size == (8, 8)


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopping at step 3 and resuming to 6 gives bit-identical weights, EMA and sampler state to one run to 6."""
    whole = run(tmp_path / "whole", "--steps", "6")
    run(tmp_path / "split", "--steps", "3")
    resumed = run(tmp_path / "split", "--steps", "6", "--resume")
    assert_same_state(whole, resumed)
    assert [r["step"] for r in log_records(tmp_path / "split")] == [2, 4, 6]


def test_resume_restores_the_sampler_summary(tmp_path):
    """The first log line after a resume carries the policy's summary even before the next sampler update."""
    run(tmp_path, "--steps", "4", "--update-every", "3")                    # updates at steps 1 and 4
    run(tmp_path, "--steps", "5", "--update-every", "3", "--resume", "--log-every", "1")
    last = log_records(tmp_path)[-1]
    assert last["step"] == 5 and "quarters" in last["sampler"] and "mean_t" in last["sampler"]


def test_resume_applies_or_refuses_changed_flags(tmp_path):
    """On --resume, --lr takes effect; a run-defining flag that differs is refused, naming both values, unwritten."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "config.json", "log.jsonl")}
    for flags, match in [(["--T", "40"], "--T 40 differs from the stored run's T = 50"),
                         (["--schedule", "cosine"], "--schedule cosine differs"),
                         (["--sampler", "uniform"], "--sampler uniform differs"),
                         (["--steps", "2"], "already at step 2")]:
        with pytest.raises(SystemExit, match=match):
            run(tmp_path, "--steps", "4", "--resume", *flags)
        assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    run(tmp_path, "--steps", "4", "--resume", "--lr", "3e-3", "--log-every", "1")
    assert log_records(tmp_path)[-1]["lr"] == pytest.approx(3e-3)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 3e-3


def test_fresh_run_refuses_to_overwrite(tmp_path):
    """Starting a fresh run into an out-dir that holds ckpt.pt stops and names --resume."""
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, "--steps", "2")


def poison(monkeypatch, at_step, how):
    """Make Trainer.train_step damage the weights when it reaches `at_step`: 'nan' or 'huge'."""
    step = ats.Trainer.train_step

    def poisoned(self, x0):
        if self.step == at_step:
            with torch.no_grad():
                self.model.conv_out.weight.fill_(math.nan if how == "nan" else 1e6)
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", poisoned)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run, names the step ckpt.pt holds, and leaves ckpt.pt untouched."""
    run(tmp_path, "--steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    poison(monkeypatch, 2, "nan")
    with pytest.raises(SystemExit, match="loss became nan by step 4.*still holds step 2"):
        run(tmp_path, "--steps", "6", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_diverged_weights_never_reach_the_checkpoint(tmp_path, monkeypatch):
    """Weights with a huge but finite loss are not saved; with no checkpoint yet, the message says so."""
    poison(monkeypatch, 1, "huge")
    with pytest.raises(SystemExit, match="diverged; not saved. No checkpoint was written"):
        run(tmp_path, "--steps", "6")
    assert not (tmp_path / "ckpt.pt").exists()
    monkeypatch.undo()
    run(tmp_path / "b", "--steps", "2")
    poison(monkeypatch, 3, "huge")
    with pytest.raises(SystemExit, match="diverged; not saved.*still holds step 2"):
        run(tmp_path / "b", "--steps", "6", "--resume")
    assert ats.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_then_exits_130(tmp_path, monkeypatch, sig):
    """SIGINT or SIGTERM during step 3 lets that step finish, saves ckpt.pt at step 3, and exits 130."""
    step, handlers = ats.Trainer.train_step, (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    def step_then_signal(self, x0):
        if self.step == 2:
            os.kill(os.getpid(), sig)
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "10", "--ckpt-every", "100")
    assert e.value.code == 130
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_torchrun_signal_saves_within_seconds(tmp_path, sig):
    """A signal to torchrun with 2 gloo workers and far --log-every/--ckpt-every saves a checkpoint within seconds."""
    out, far = tmp_path / "run", "100000"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(HERE, "train.py"), *TINY, "--out-dir", str(out), "--steps", far, "--log-every", far,
           "--ckpt-every", far, "--sample-every", far]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:  # written just before step 1
            time.sleep(0.2)
        time.sleep(3.0)
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    step = ats.load_checkpoint(str(out / "ckpt.pt"))["step"]  # no checkpoint was scheduled before step 100000
    assert step > 0 and f"interrupted at step {step}" in output, output


def test_cifar10_without_data_or_network_gives_clear_error(tmp_path, monkeypatch):
    """With no local CIFAR-10 and a failing download, train.py exits with one message naming the fixes."""
    def no_network(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--device", "cpu",
                    "--ch", "16", "--ch-mult", "1,2", "--num-res", "1"])
    assert "CIFAR-10" in e.value.code and "--dataset synthetic" in e.value.code
    assert not (tmp_path / "run").exists()


def test_cifar10_is_decoded_into_one_uint8_tensor(monkeypatch):
    """CIFAR-10's (N, 32, 32, 3) array becomes a (N, 3, S, S) uint8 tensor, resized when --image-size is not 32."""
    arrays = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data = arrays.numpy()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    full = train.make_dataset(train.Config())
    assert full.dtype == torch.uint8 and torch.equal(full, arrays.permute(0, 3, 1, 2))
    assert train.make_dataset(train.Config(image_size=16)).shape == (5, 3, 16, 16)


@pytest.mark.parametrize("flags, match", [
    (["--batch-size", "0"], "--batch-size"), (["--T", "1"], "--T must be at least 2"),
    (["--num-selected", "60"], "--num-selected must be in"), (["--update-every", "0"], "--update-every"),
    (["--lr", "nan"], "--lr"), (["--policy-lr", "-1"], "--policy-lr"), (["--image-size", "-4"], "--image-size"),
    (["--ch-mult", ""], "--ch-mult needs"), (["--ch-mult", "1,x"], "comma-separated"),
    (["--attn-res", "7"], "--attn-res 7 names sizes no level has"), (["--ch", "15"], "--ch must be an even"),
    (["--dropout", "1.5"], "--dropout"), (["--sample-steps", "99"], "--sample-steps"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/x"], "does not exist")])
def test_bad_flags_give_one_error_line_and_create_nothing(tmp_path, flags, match):
    """Every impossible setting exits with one 'error:' line before anything is written."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", *flags)
    assert e.value.code.startswith("error:") and match in e.value.code and "\n" not in e.value.code
    assert not (tmp_path / "run").exists()


def test_train_cli_error_has_no_traceback(tmp_path):
    """Run as a script, a bad flag gives exit code 1 and one line, not a traceback."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--batch-size", "0", "--out-dir",
                             str(tmp_path / "r")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_folder_dataset_reads_resizes_and_names_a_corrupt_file(tmp_path):
    """--dataset folder reads images resized and cropped; a corrupt file stops training with one line naming it."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), "red").save(tmp_path / "a.png")
    Image.new("L", (9, 30)).save(tmp_path / "sub" / "b.jpg")
    data = train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path), image_size=8))
    assert len(data) == 2 and all(data[i].shape == (3, 8, 8) for i in range(2))
    with pytest.raises(SystemExit, match="no images"):
        (tmp_path / "empty").mkdir()
        train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path / "empty"), image_size=8))
    for i in range(14):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for on_device, workers in (("yes", "0"), ("no", "0"), ("no", "1")):
        with pytest.raises(SystemExit, match=r"error: cannot read image .*broken\.png"):
            run(tmp_path / f"out{on_device}{workers}", "--dataset", "folder", "--data-dir", str(tmp_path),
                "--on-device", on_device, "--workers", workers, "--channels", "3", "--steps", "8")


def test_resident_data_gives_the_dataloader_batches():
    """Batches indexed from a tensor on the device equal the DataLoader's, epoch after epoch, from any step."""
    cfg = train.Config(**{**TINY_CFG, "workers": 0})
    data = train.synthetic_shapes(20, 8, 1, seed=0)
    dataset = [data[i] for i in range(len(data))]
    for start in (0, 3):
        a = train.batches(cfg, data, train.batch_indices(20, 4, 0, 1, 0, start), torch.device("cpu"))
        b = train.batches(cfg, dataset, train.batch_indices(20, 4, 0, 1, 0, start), torch.device("cpu"))
        for _ in range(12):  # three epochs of 5 batches
            assert torch.equal(next(a), next(b))


def test_sample_checks_every_output_before_any_forward(tmp_path, monkeypatch):
    """Bad --grid and --out-dir paths fail with one line before the model runs a single forward."""
    run(tmp_path, "--steps", "2")
    monkeypatch.setattr(ats.UNet, "forward", lambda *a: pytest.fail("a forward ran"))
    (tmp_path / "file").write_text("x")
    ckpt = str(tmp_path / "ckpt.pt")
    for flags in (["--grid", "/nonexistent/x.png"], ["--grid", str(tmp_path)], ["--out-dir", str(tmp_path / "file")],
                  ["--out-dir", str(tmp_path / "file" / "sub")]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", ckpt, *flags])
        assert e.value.code.startswith("error:") and "\n" not in e.value.code
    with pytest.raises(SystemExit, match="--grid FILE and/or --out-dir"):
        sample.main(["--ckpt", ckpt])
    with pytest.raises(SystemExit, match="--steps must be in"):
        sample.main(["--ckpt", ckpt, "--steps", "51", "--grid", str(tmp_path / "g.png")])


def test_sample_folder_extension_equals_one_shot(tmp_path, capsys):
    """Extending a folder from 6 to 10 images gives the images of one 10-image call, bitwise; a different seed
    is refused; progress uses no carriage returns when stdout is not a terminal."""
    run(tmp_path, "--steps", "2")
    ckpt = str(tmp_path / "ckpt.pt")
    sample.main(["--ckpt", ckpt, "--steps", "3", "--n", "6", "--batch-size", "4", "--out-dir", str(tmp_path / "a")])
    sample.main(["--ckpt", ckpt, "--steps", "3", "--n", "10", "--batch-size", "4", "--out-dir", str(tmp_path / "a")])
    sample.main(["--ckpt", ckpt, "--steps", "3", "--n", "10", "--batch-size", "3", "--out-dir", str(tmp_path / "b")])
    for i in range(10):
        a, b = (torchvision.io.read_image(str(tmp_path / d / f"{i:06d}.png")) for d in "ab")
        assert torch.equal(a, b), i
    assert "\r" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed 0 .now 1."):
        sample.main(["--ckpt", ckpt, "--steps", "3", "--n", "12", "--seed", "1", "--out-dir", str(tmp_path / "a")])


@pytest.mark.parametrize("kind", ["missing", "corrupt", "foreign"])
def test_sample_bad_checkpoint_gives_clear_error(tmp_path, kind):
    """sample.py on a missing, corrupt or foreign checkpoint exits with one 'error:' line naming the file."""
    path = tmp_path / "ckpt.pt"
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(path), "--grid", str(tmp_path / "g.png")])
    assert e.value.code.startswith("error:") and str(path) in e.value.code


def test_sample_cli_error_has_no_traceback(tmp_path):
    """Run as a script, a bad --ckpt gives a nonzero exit and a message, not a traceback."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--ckpt", str(tmp_path / "no.pt"),
                             "--grid", "g.png"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script", [train, sample])
def test_help_works(script, capsys):
    """--help prints the usage and exits 0 for both scripts."""
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_preset_then_explicit_flag():
    """Defaults < preset < explicit flag, for numbers and for --flag/--no-flag booleans."""
    assert train.parse_config([]) == train.Config()
    cfg = train.parse_config(["--preset", "tiny", "--steps", "7", "--no-hflip"])
    assert cfg.steps == 7 and not cfg.hflip and cfg.ch == train.PRESETS["tiny"]["ch"]
    assert train.parse_config(["--steps", "7", "--preset", "tiny"]).steps == 7


def test_synthetic_data_is_deterministic_and_structured():
    """The same seed gives the same images, another seed other images, and images are not flat noise."""
    a, b = train.synthetic_shapes(8, 16, 3, seed=0), train.synthetic_shapes(8, 16, 3, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 16, 16)
    assert torch.equal(a, train.synthetic_shapes(8, 16, 3, seed=0)) and not torch.equal(a, b)
    x = a.float()
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.5 * (x - x.mean()).abs().mean()  # neighbours agree


def _ddp_rank(rank, world, port, out_dir, extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    built, build = [], train.build
    train.build = lambda cfg, device: built.append(build(cfg, device)) or built[-1]
    train.main([*TINY, "--out-dir", out_dir, *extra])
    trainer = built[0]
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                "policy": trainer.sampler.policy.state_dict(), "queue_x": trainer.sampler.queue_x,
                "S": trainer.sampler.S}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_run_stays_in_sync_and_resumes(tmp_path):
    """With 2 gloo processes, weights, policy, queue and S match across ranks; ckpt.pt resumes in 1 and 2."""
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "8"]), nprocs=2)  # updates at 0, 2, 4, 6
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("model", "ema", "policy"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name} differs between ranks"
    assert len(r0["queue_x"]) == 3 and torch.equal(r0["queue_x"], r1["queue_x"]) and torch.equal(r0["S"], r1["S"])
    start = ats.AdaptiveTimestepSampler(50, vlb_fn=None, in_channels=3).policy.state_dict()
    assert not torch.equal(r0["policy"]["15.weight"], start["15.weight"])  # the policy did move
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8
    assert run(tmp_path, "--steps", "10", "--resume")["step"] == 10
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "12", "--resume"]), nprocs=2)
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 12


# ---------------------------------------------------------------------------------------------
# bench.py smoke tests (no timings asserted)
# ---------------------------------------------------------------------------------------------

TOY_MODEL = "ch=8,ch_mult=1,num_res=1,attn_res=,dropout=0.1,T=20,sample_steps=5"


def test_speed_reports_finite_numbers(tmp_path):
    """`speed --quick` at toy sizes prints finite per-step times, ratio and breakdown; throughput and profile run."""
    result = bench.main(["speed", "--device", "cpu", "--quick", "--batch-size", "4", "--update-every", "3",
                         "--cycles", "1", "--throughput", "--no-compile", "--tp-warmup", "1", "--tp-steps", "1",
                         "--profile", str(tmp_path / "profile.txt"), "--set", TOY_MODEL + ",image_size=8"])
    for key in ("uniform_s", "ats_s", "ratio", "probe_share", "policy_ms_forward"):
        assert math.isfinite(result[key]), key
    assert len(result["throughput"]) == 4 and all(row["images_s"] > 0 for row in result["throughput"])
    assert "convolution" in (tmp_path / "profile.txt").read_text()


def test_converge_quick_writes_results_and_merges(tmp_path):
    """`converge --quick` at toy sizes writes JSON, markdown and a policy heatmap with finite metrics; two
    one-seed folders merge into one table."""
    pytest.importorskip("sklearn")
    common = ["converge", "--device", "cpu", "--quick", "--steps", "6", "--samples", "20", "--nll-images", "2",
              "--ddim-steps", "2", "--variants", "uniform,ats-paper,lsm", "--variant", "mine:entropy_coef=0",
              "--set", TOY_MODEL + ",batch_size=8,update_every=2"]
    for seed in (0, 1):
        results = bench.main([*common, "--first-seed", str(seed), "--out", str(tmp_path / f"s{seed}")])
        points = [p for run in results["runs"] for p in run["curve"]]
        assert points and all(math.isfinite(p["nll"]) and math.isfinite(p["fd"]) for p in points)
    for name in ("results.json", "results.md", "policy_ats-paper_seed0.png", "policy_mine_seed0.png"):
        assert os.path.isfile(tmp_path / "s0" / name), name
    merged = bench.main(["report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")])
    assert merged["summary"]["uniform"]["seeds"] == [0, 1] and (tmp_path / "all" / "results.md").is_file()


def test_readme_snippet_runs_with_the_class_copied_alone():
    """The README's snippet runs with AdaptiveTimestepSampler's source copied alone (plus ats.py's imports)."""
    import inspect
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## Use the sampler in your own training loop"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    copied = {}
    exec("import contextlib, math\nimport torch\nimport torch.distributed as dist\nimport torch.nn as nn\n"
         "import torch.nn.functional as F\n" + inspect.getsource(ats.AdaptiveTimestepSampler), copied)
    torch.manual_seed(0)
    model, diffusion = tiny_unet(), ats.GaussianDiffusion(T=20)
    scope = {"T": 20, "model": model, "diffusion": diffusion, "loader": [blobs(4), blobs(4, seed=1)],
             "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}
    code = code.replace("from ats import AdaptiveTimestepSampler", "")
    namespace = {**scope, "AdaptiveTimestepSampler": copied["AdaptiveTimestepSampler"]}
    exec(code.replace('device="cuda"', 'device="cpu"').replace("in_channels=3", "in_channels=1"), namespace)
    assert namespace["sampler"].step == 2 and len(namespace["sampler"].queue_y) == 1
