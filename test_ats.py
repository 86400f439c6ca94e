"""Tests for ats.py, train.py, sample.py and bench.py. CPU only, a few minutes on 2 cores."""

import json
import math
import os
import signal
import socket
import subprocess
import sys

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
    """The CIFAR-10 configuration has the DDPM parameter count, 35.7M within 1%."""
    n = sum(p.numel() for p in ats.UNet().parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.01


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
    p = s.probs(x0[:1])[0].double()
    counts = torch.bincount(t, minlength=T).double()
    stat = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2_sf(stat, T - 1) > 1e-3


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
    """UniformSampler draws in [0, T), is seeded, and its update hook is a no-op."""
    s = ats.UniformSampler(10)
    x0 = torch.zeros(1000, 1, 2, 2)
    t = s.sample(x0, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 10 and len(t.unique()) == 10
    assert torch.equal(t, s.sample(x0, generator=torch.Generator().manual_seed(0)))
    ran = []
    with s.around_update(x0, t):
        ran.append(1)
    assert ran == [1] and s.state_dict() == {}


# ---------------------------------------------------------------------------------------------
# the adaptive sampler: learning, probe, feature selection, options
# ---------------------------------------------------------------------------------------------


def test_reinforce_moves_mass_toward_rewarded_timesteps():
    """REINFORCE with a reward that favours small t moves mass into the first quarter of [0, T)."""
    torch.manual_seed(0)
    T = 100
    s = ats.AdaptiveTimestepSampler(T, vlb_fn=None, in_channels=1, lr=1e-2)
    x0 = torch.randn(32, 1, 8, 8)
    first_quarter = lambda: s.probs(x0)[:, : T // 4].sum(1).mean().item()
    start = first_quarter()
    for _ in range(200):
        t = s.sample(x0)
        s._learn(x0, t, reward=(t < T // 4).float())
    assert start == pytest.approx(0.25, abs=0.01)
    assert first_quarter() > 0.5


def test_probe_is_clean_without_an_update():
    """With dropout on and no model change between the probes, every delta and reward is exactly 0."""
    torch.manual_seed(0)
    d = ats.GaussianDiffusion(T=30)
    model = tiny_unet(dropout=0.5).train()
    s = ats_sampler(30, model, d)
    rewards = []
    learn = s._learn
    s._learn = lambda x0, t, r: (rewards.append(r), learn(x0, t, r))
    x0 = blobs(8)
    with s.around_update(x0, s.sample(x0)):
        pass
    assert model.training  # restored after the probe
    assert torch.equal(s.queue_x[-1], torch.zeros(30, dtype=torch.float64))
    assert torch.equal(rewards[0], torch.zeros(8))


def test_probe_sees_a_real_update():
    """With an optimizer step between the probes, the sweep deltas and rewards are non-zero."""
    torch.manual_seed(0)
    d = ats.GaussianDiffusion(T=30)
    model = tiny_unet(dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s = ats_sampler(30, model, d)
    rewards = []
    learn = s._learn
    s._learn = lambda x0, t, r: (rewards.append(r), learn(x0, t, r))
    x0 = blobs(8)
    t = s.sample(x0)
    d.loss(model, x0, t).mean().backward()
    with s.around_update(x0, t):
        opt.step()
    assert (s.queue_x[-1] != 0).sum() > 25
    assert (rewards[0] != 0).all()


def test_update_runs_every_f_s_global_steps():
    """The probe and policy step run exactly at global steps 0, f_S, 2 f_S, ...; S is updated from 3 rows on."""
    d = ats.GaussianDiffusion(T=20)
    model = tiny_unet()
    s = ats_sampler(20, model, d, update_every=4, k=2)
    x0 = blobs(4)
    for _ in range(13):
        with s.around_update(x0, s.sample(x0)):
            pass
    assert s.step == 13 and len(s.queue_y) == 4 and s.history_steps == [0, 4, 8, 12]


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
    s = ats.AdaptiveTimestepSampler(50, vlb_fn=None, queue_size=5, k=2)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        delta = 0.01 * torch.randn(50, generator=g, dtype=torch.float64)
        delta[[11, 42]] += 10 * torch.randn(1, generator=g, dtype=torch.float64)
        s._push_queue(delta)
        assert s.S.tolist() == ([0, 1] if i < 2 else [11, 42])  # S = {0..k-1} until 3 rows
    assert len(s.queue_y) == 5 and torch.equal(s.queue_x[-1], delta)


def test_mixture_probabilities_still_normalised():
    """With a uniform-mixture floor eps, pi sums to 1 and every p >= eps / T."""
    s = ats.AdaptiveTimestepSampler(100, vlb_fn=None, mix=0.2)
    a = torch.tensor([1e-3, 1.0, 1e3, 50.0])
    b = torch.tensor([1e3, 1.0, 1e-3, 0.5])
    p = s.log_probs_from_ab(a, b).exp()
    assert (p.double().sum(1) - 1).abs().max() < 1e-6
    assert p.min() >= 0.2 / 100 * (1 - 1e-5)


def test_standardised_advantages_have_mean_zero():
    """Standardised advantages have mean 0 and std 1; the baseline option only centres."""
    r = torch.tensor([0.3, -1.0, 2.0, 0.01, 5.0])
    adv = ats.AdaptiveTimestepSampler(10, vlb_fn=None, standardize=True).advantage(r)
    assert abs(adv.mean().item()) < 1e-6 and adv.std().item() == pytest.approx(1, rel=1e-5)
    centred = ats.AdaptiveTimestepSampler(10, vlb_fn=None, baseline=True).advantage(r)
    torch.testing.assert_close(centred, r - r.mean())
    assert torch.equal(ats.AdaptiveTimestepSampler(10, vlb_fn=None).advantage(r), r)


def test_ab_bounds_hold():
    """With ab_range = (1, 20), a and b stay in [1, 20] even when the network asks for extremes."""
    s = ats.AdaptiveTimestepSampler(100, vlb_fn=None, in_channels=1, ab_range=(1.0, 20.0))
    x0 = torch.randn(4, 1, 8, 8)
    for a, b in [(1e-3, 1e3), (1e3, 1e-3), (0.5, 0.5)]:
        set_ab(s, a, b)
        pa, pb = s.ab(x0)
        assert pa.min() >= 1 and pb.min() >= 1 and pa.max() <= 20 and pb.max() <= 20



def test_policy_at_a_bound_still_learns():
    """With a and b pinned at the lower bound, the policy's last layer still receives a gradient."""
    s = ats.AdaptiveTimestepSampler(100, vlb_fn=None, in_channels=1, ab_range=(1.0, 20.0))
    set_ab(s, 0.5, 0.5)
    x0 = torch.randn(4, 1, 8, 8)
    s.log_probs(x0)[:, 0].sum().backward()
    assert s.policy[-1].bias.grad.abs().min() > 0


# ---------------------------------------------------------------------------------------------
# training, checkpoints, sampling
# ---------------------------------------------------------------------------------------------


def make_trainer(sampler="ats", seed=0, T=50):
    torch.manual_seed(seed)
    model = tiny_unet()
    d = ats.GaussianDiffusion(T=T)
    s = ats_sampler(T, model, d, update_every=3, seed=seed) if sampler == "ats" else ats.UniformSampler(T)
    return ats.Trainer(model, d, s, lr=2e-3, warmup=5, ema_decay=0.9)


def batches(data, batch, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(0, len(data), (batch,), generator=g)]


def test_training_lowers_the_loss():
    """About 100 steps on a small generated dataset lower the average loss."""
    trainer = make_trainer("ats")
    losses = []
    trainer.run(batches(blobs(256), 32, 0), 120, on_step=lambda tr, loss: losses.append(loss.item()))
    assert trainer.step_count == 120
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_bf16_autocast_step_runs_on_cpu():
    """A training step under bf16 autocast runs on CPU and gives a finite loss."""
    torch.manual_seed(0)
    model = tiny_unet()
    d = ats.GaussianDiffusion(T=50)
    trainer = ats.Trainer(model, d, ats_sampler(50, model, d, update_every=1), amp="bf16")
    assert trainer.amp_dtype == torch.bfloat16
    assert torch.isfinite(trainer.step(blobs(8)))


def test_checkpoint_round_trip_restores_everything(tmp_path):
    """save_checkpoint then load restores model, EMA, optimizer, scheduler, sampler, step and config."""
    trainer = make_trainer("ats")
    trainer.run(batches(blobs(64), 8, 0), 7)
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
    assert fresh.sched.get_last_lr() == trainer.sched.get_last_lr() and fresh.step_count == 7


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """Stopping at step 10, saving and resuming gives bit-identical weights at step 20 on CPU."""
    data = blobs(64)
    straight = make_trainer("ats")
    torch.manual_seed(123)
    straight.run(batches(data, 8, 0), 20)

    first = make_trainer("ats")
    torch.manual_seed(123)
    stream = batches(data, 8, 0)
    first.run(stream, 10)
    ats.save_checkpoint(tmp_path / "ckpt.pt", first, {})
    ckpt = ats.load_checkpoint(tmp_path / "ckpt.pt")
    second = make_trainer("ats", seed=5)
    second.load_state_dict(ckpt)
    ats.set_rng_state(ckpt["rng"])
    second.run(stream, 20)
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.sampler.policy.parameters(), second.sampler.policy.parameters()):
        assert torch.equal(a, b)


def test_bad_checkpoint_files_give_one_clear_error(tmp_path):
    """Missing, truncated and foreign files each raise CheckpointError naming the problem."""
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


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_shape_range_and_determinism(method):
    """DDPM and DDIM return the right shape, values in [-1, 1], and the same images under the same seed."""
    torch.manual_seed(0)
    d = ats.GaussianDiffusion(T=40)
    model = tiny_unet().eval()
    with torch.no_grad():  # a non-trivial output layer, so samples are not just noise
        model.out[-1].weight.normal_(0, 0.3)
    draw = (lambda g: d.ddpm_sample(model, (3, 1, 8, 8), generator=g)) if method == "ddpm" else \
        (lambda g: d.ddim_sample(model, (3, 1, 8, 8), steps=10, eta=0.5, generator=g))
    x = draw(torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, draw(torch.Generator().manual_seed(1)))
    assert not torch.equal(x, draw(torch.Generator().manual_seed(2)))


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
    """The T-sweep split over ranks (T not divisible by the world size) and all-gathered equals one process's."""
    out = tmp_path / "sweep.pt"
    mp.spawn(_sweep_worker, args=(world, free_port(), T, str(out)), nprocs=world)
    s, x_star, noise = sweep_setup(T)
    torch.testing.assert_close(torch.load(out), s.sweep(x_star, noise), rtol=1e-5, atol=1e-7)  # batch-size rounding


# ---------------------------------------------------------------------------------------------
# train.py and sample.py
# ---------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--dataset", "synthetic", "--synthetic-n", "32", "--image-size", "8", "--ch", "16", "--ch-mult", "1,2",
        "--num-res", "1", "--attn-res=", "--T", "50", "--batch-size", "8", "--warmup", "1", "--ats-every", "2",
        "--ats-queue", "3", "--probe-batch", "64", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "4",
        "--sample-n", "4", "--sample-steps", "3", "--workers", "0", "--device", "cpu", "--ema-decay", "0.9"]


def run(out_dir, *extra):
    train.main([*TINY, "--out-dir", str(out_dir), *extra])
    return ats.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


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
    assert ckpt["step"] == 4 and ckpt["config"]["ch"] == 16
    for name in ("ckpt.pt", "grid_0000004.png", "log.jsonl", "sampler.png", "config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "img_per_s", "sampler"} <= set(records[-1]) and "quarters" in records[-1]["sampler"]
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    assert Image.open(out / "sampler.png").size == (50, 256)  # (T, --heatmap-height)
    grid, folder = tmp_path / "grid.png", tmp_path / "imgs"
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--n", "3", "--batch-size", "2", "--steps", "3",
                 "--grid", str(grid), "--out-dir", str(folder)])
    assert grid.is_file() and sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(folder / "000000.png").size == (8, 8)
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--n", "5", "--ddpm", "--no-ema", "--out-dir", str(folder)])
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(5)]


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopping at step 3 and resuming to 6 gives bit-identical weights, EMA and sampler state to one run to 6."""
    whole = run(tmp_path / "whole", "--steps", "6")
    run(tmp_path / "split", "--steps", "3")
    resumed = run(tmp_path / "split", "--steps", "6", "--resume")
    assert_same_state(whole, resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_fresh_run_refuses_to_overwrite(tmp_path):
    """Starting a fresh run into an out-dir that holds ckpt.pt stops and names --resume."""
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, "--steps", "2")


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run with a clear message and leaves the last good ckpt.pt untouched."""
    run(tmp_path, "--steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    step = ats.Trainer.step
    monkeypatch.setattr(ats.Trainer, "step", lambda self, x0, generator=None: step(self, x0, generator) * torch.nan)
    with pytest.raises(SystemExit, match="loss became nan"):
        run(tmp_path, "--steps", "4", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_ctrl_c_saves_then_exits(tmp_path, monkeypatch):
    """Ctrl-C during step 3 lets that step finish, saves ckpt.pt at step 3, and exits naming --resume."""
    step, handler = ats.Trainer.step, signal.getsignal(signal.SIGINT)

    def step_then_ctrl_c(self, x0, generator=None):
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, x0, generator)
    monkeypatch.setattr(ats.Trainer, "step", step_then_ctrl_c)
    with pytest.raises(SystemExit, match="interrupted at step 3.*--resume"):
        run(tmp_path, "--steps", "10")
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_cifar10_without_data_or_network_gives_clear_error(tmp_path, monkeypatch):
    """With no local CIFAR-10 and a failing download, train.py exits with one message naming the fixes."""
    def no_network(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--device", "cpu",
                    "--ch", "16", "--ch-mult", "1,2", "--num-res", "1"])
    assert "CIFAR-10" in e.value.code and "--dataset synthetic" in e.value.code


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


def test_sample_refuses_impossible_settings(tmp_path):
    """sample.py refuses DDIM steps beyond the model's T and a call with nowhere to write."""
    run(tmp_path, "--steps", "2")
    ckpt = str(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="--steps must be in"):
        sample.main(["--ckpt", ckpt, "--steps", "51", "--grid", str(tmp_path / "g.png")])
    with pytest.raises(SystemExit, match="--grid FILE and/or --out-dir"):
        sample.main(["--ckpt", ckpt])


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


def test_bad_settings_give_one_line_errors():
    """Indivisible batches, sizes the U-Net can't halve and bad lists stop with a message."""
    with pytest.raises(SystemExit, match="does not divide"):
        train.check(train.Config(batch_size=10), world=3)
    with pytest.raises(SystemExit, match="divisible by 2"):
        train.check(train.Config(image_size=12), world=1)
    with pytest.raises(SystemExit, match="comma-separated"):
        train.ints("1,x")


def test_synthetic_data_is_deterministic_and_structured():
    """The same seed gives the same images, another seed other images, and images are not flat noise."""
    a, b = train.synthetic_shapes(8, 16, 3, seed=0), train.synthetic_shapes(8, 16, 3, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 16, 16)
    assert torch.equal(a, train.synthetic_shapes(8, 16, 3, seed=0)) and not torch.equal(a, b)
    x = a.float()
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.5 * (x - x.mean()).abs().mean()  # neighbours agree


def test_folder_dataset_resizes_and_crops(tmp_path):
    """--dataset folder reads any images under the folder, resized and centre-cropped to --image-size."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), "red").save(tmp_path / "a.png")
    Image.new("L", (9, 30)).save(tmp_path / "sub" / "b.jpg")
    data = train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path), image_size=8))
    assert len(data) == 2 and all(data[i][0].shape == (3, 8, 8) for i in range(2))
    with pytest.raises(SystemExit, match="no images"):
        train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path / "empty"), image_size=8))


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
                "S": trainer.sampler.S, "history": trainer.sampler.history}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_run_stays_in_sync_and_resumes(tmp_path):
    """With 2 gloo processes, weights, policy, queue and S match across ranks; ckpt.pt resumes in 1 and 2."""
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "8"]), nprocs=2)  # updates at 0, 2, 4, 6
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("model", "ema", "policy"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name} differs between ranks"
    assert len(r0["queue_x"]) == 3 and torch.equal(r0["queue_x"], r1["queue_x"]) and torch.equal(r0["S"], r1["S"])
    assert not torch.equal(r0["history"][0], r0["history"][-1])  # the policy did move
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8
    assert run(tmp_path, "--steps", "10", "--resume")["step"] == 10
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "12", "--resume"]), nprocs=2)
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 12


# ---------------------------------------------------------------------------------------------
# bench.py smoke tests (no timings asserted)
# ---------------------------------------------------------------------------------------------

TOY_MODEL = "ch=8,ch_mult=1,num_res=1,attn_res=,dropout=0.1,T=20"


def test_speed_reports_finite_numbers():
    """`speed --quick` at toy sizes prints finite per-step times, ratio and breakdown; throughput runs too."""
    result = bench.main(["speed", "--device", "cpu", "--quick", "--B", "4", "--every", "3", "--cycles", "1",
                         "--throughput", "--no-compile", "--tp-steps", "1", "--set", TOY_MODEL + ",image_size=8"])
    for key in ("uniform_s", "ats_s", "ratio", "probe_share", "policy_ms_forward"):
        assert math.isfinite(result[key]), key
    assert all(row["images_s"] > 0 for row in result["throughput"])


def test_converge_quick_writes_results(tmp_path):
    """`converge --quick` at toy sizes writes JSON, markdown, curves and a policy heatmap with finite metrics."""
    pytest.importorskip("sklearn")
    out = tmp_path / "bench"
    results = bench.main(["converge", "--device", "cpu", "--quick", "--steps", "6", "--samples", "20",
                          "--nll-images", "2", "--ddim-steps", "2", "--out", str(out),
                          "--variant", "released:released_probe=1", "--variants", "uniform,ats-paper",
                          "--set", TOY_MODEL + ",batch_size=8,ats_every=2"])
    for name in ("results.json", "results.md", "curves.png", "policy_ats-paper_seed0.png",
                 "policy_released_seed0.png"):
        assert os.path.isfile(out / name), name
    points = [p for run in results["runs"] for p in run["curve"]]
    assert points and all(math.isfinite(p["nll"]) and math.isfinite(p["fd"]) for p in points)


def test_readme_snippet_runs():
    """The README's copy-into-your-loop snippet runs as written (on CPU) and drives a sampler update."""
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## Use the sampler in your own training loop"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    torch.manual_seed(0)
    model, diffusion = tiny_unet(), ats.GaussianDiffusion(T=20)
    scope = {"T": 20, "model": model, "diffusion": diffusion, "loader": [blobs(4), blobs(4, seed=1)],
             "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}
    exec(code.replace('device="cuda"', 'device="cpu"').replace("in_channels=3", "in_channels=1"), scope)
    assert scope["sampler"].step == 2 and len(scope["sampler"].queue_y) == 1
