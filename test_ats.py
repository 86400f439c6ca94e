"""ats.py: the diffusion maths, the U-Net, the sampler API, the adaptive sampler, the Trainer and
checkpoints. CPU only."""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import ats
from conftest import (
    Oracle,
    ats_sampler,
    batches,
    blobs,
    chi2_pvalue,
    copied,
    ddpm,
    entropy_gradient,
    free_port,
    make_trainer,
    nudge,
    readme_snippets,
    set_ab,
    tiny_unet,
)

# ---------------------------------------------------------------------------------------------
# Schedules, q_sample and the VLB terms (ats.py section 1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "quad", "cosine"])
def test_schedule_abar_monotone_in_unit_interval(schedule):
    """abar_t lies in (0, 1) and strictly decreases for every schedule."""
    abar = ddpm(1000, schedule).abar
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_unknown_schedule_and_variance_are_refused():
    """A bad schedule or variance name raises one ValueError naming the choices."""
    with pytest.raises(ValueError, match="linear"):
        ats.make_betas("sigmoid", 100)
    with pytest.raises(ValueError, match="large"):
        ddpm(100, var_type="learned")


def test_q_sample_moments_match_theory():
    """q(x_t | x0) has mean sqrt(abar_t) x0 and variance 1 - abar_t."""
    d = ddpm(1000, "linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t in (0, 300, 999):
        tt = torch.full((len(x0),), t)
        xt = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        assert xt.mean().item() == pytest.approx(0.7 * d.abar[t].sqrt().item(), abs=0.01)
        assert xt.var().item() == pytest.approx(1 - d.abar[t].item(), abs=0.01)


def test_oracle_model_has_zero_kl_with_small_variance():
    """With 'small' variance a model that predicts the true noise has L_t = 0 for every t >= 1."""
    d = ddpm(1000, "linear", var_type="small")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    for t in (1, 2, 50, 500, 999):
        kl = d.vlb_terms(Oracle(noise), x0, torch.full((8,), t), noise)
        assert kl.abs().max().item() < 1e-5


def test_vlb_terms_match_closed_form_on_one_pixel():
    """L_t and L_0 equal an independent float64 computation from the DDPM formulas."""
    T = 10
    d = ddpm(T, "linear", var_type="large")
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar = [math.prod(1 - b for b in betas[: i + 1]) for i in range(T)]
    x0, eps, eps_model = 0.3, -0.8, 0.5

    class Const(nn.Module):
        def forward(self, xt, t):
            return torch.full_like(xt, eps_model)

    for t in (0, 1, 5, 9):
        ab, ab_prev, beta = abar[t], (abar[t - 1] if t else 1.0), betas[t]
        xt = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
        c1 = beta * math.sqrt(ab_prev) / (1 - ab)
        c2 = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        x0_hat = (xt - math.sqrt(1 - ab) * eps_model) / math.sqrt(ab)
        mu_q, mu_p = c1 * x0 + c2 * xt, c1 * x0_hat + c2 * xt
        var_q = beta * (1 - ab_prev) / (1 - ab)
        # 'large', var_post[1] at t = 0
        var_p = betas[t] if t else betas[1] * (1 - abar[0]) / (1 - abar[1])
        if t == 0:
            sd = math.sqrt(2 * var_p)
            mass = 0.5 * (math.erf((x0 - mu_p + 1 / 255) / sd)
                          - math.erf((x0 - mu_p - 1 / 255) / sd))
            expected = -math.log(mass) / math.log(2)
        else:
            kl_nats = 0.5 * (math.log(var_p / var_q) + var_q / var_p
                             + (mu_q - mu_p) ** 2 / var_p - 1)
            expected = kl_nats / math.log(2)
        got = d.vlb_terms(Const(), torch.full((1, 1, 1, 1), x0), torch.tensor([t]),
                          torch.full((1, 1, 1, 1), eps))
        assert got.item() == pytest.approx(expected, rel=1e-3, abs=1e-6), t


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_prior_term_is_negligible(schedule):
    """KL(q(x_T | x0) || N(0, I)) is below 1e-4 bits/dim at T = 1000 for data in [-1, 1]."""
    d = ddpm(1000, schedule)
    x0 = torch.tensor([-1.0, -0.3, 0.0, 1.0]).view(4, 1, 1, 1)
    assert ats.prior_bpd(d, x0).max().item() < 1e-4


def test_nll_bpd_is_sum_of_terms_and_chunk_independent():
    """nll_bpd equals prior + sum_t L_t, whatever the chunk size."""
    d = ddpm(20, "linear")
    model = tiny_unet().eval()
    x0 = blobs(3)
    a = ats.nll_bpd(d, model, x0, batch_size=7, generator=torch.Generator().manual_seed(0))
    b = ats.nll_bpd(d, model, x0, batch_size=60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    noise = torch.randn((3 * 20, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.arange(20).repeat(3)
    terms = d.vlb_terms(model, x0.repeat_interleave(20, 0), t, noise).view(3, 20)
    torch.testing.assert_close(a, terms.sum(1) + ats.prior_bpd(d, x0))


def test_config_rebuilds_the_diffusion_bitwise():
    """GaussianDiffusion(**d.config) has bitwise d's buffers, float32 betas give the same T."""
    given = ddpm(100, "cosine", prediction="v", var_type="small")
    rebuilt = ats.GaussianDiffusion(**given.config)
    assert rebuilt.T == 100 and rebuilt.prediction == "v"
    assert all(torch.equal(a, b) for a, b in zip(given.buffers(), rebuilt.buffers()))


def test_bad_betas_and_prediction_are_refused():
    """Betas outside (0, 1) or not 1-D, betas whose abar rounds to 1 or vanishes (NaN buffers or
    a VLB of thousands), and an unknown prediction type each raise one ValueError."""
    for betas in (torch.linspace(0, 0.02, 10), torch.linspace(1e-4, 1, 10), torch.ones(2, 5) / 9):
        with pytest.raises(ValueError, match="beta"):
            ats.GaussianDiffusion(betas=betas)
    for betas in (torch.full((100,), 1e-20), torch.full((100,), 0.9999)):
        with pytest.raises(ValueError, match="abar_t"):
            ats.GaussianDiffusion(betas)
    with pytest.raises(ValueError, match="'eps', 'v' or 'x0'"):
        ats.GaussianDiffusion(ats.make_betas("linear", 10), prediction="epsilon")


def as_prediction(eps_model, d, kind):
    """eps_model rewritten to predict v or x0, by the exact identities, in float64."""
    def forward(xt, t):
        a = d.sqrt_abar.double()[t].view(-1, 1, 1, 1)
        s = d.sqrt_1m_abar.double()[t].view(-1, 1, 1, 1)
        eps = eps_model(xt, t).double()
        x0 = (xt.double() - s * eps) / a
        return (a * eps - s * x0 if kind == "v" else x0).float()
    return forward


@pytest.mark.parametrize("kind", ["v", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_and_x0_models_have_the_eps_models_vlb(kind, schedule):
    """A model written to predict v (or x0) has the same VLB terms, at t = 0, 1, middle and T-1,
    as the eps model it was converted from."""
    torch.manual_seed(0)
    T = 50
    eps_d = ddpm(T, schedule)
    other = ddpm(T, schedule, prediction=kind)
    model = tiny_unet().eval()
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.3)
    x0, g = blobs(4), torch.Generator().manual_seed(1)
    for t in (0, 1, 25, T - 1):
        tt, noise = torch.full((4,), t), torch.randn((4, 1, 8, 8), generator=g)
        expected = eps_d.vlb_terms(model, x0, tt, noise)
        got = other.vlb_terms(as_prediction(model, eps_d, kind), x0, tt, noise)
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_loss_is_zero_for_the_true_target(kind):
    """L_simple is exactly 0 for a model that returns its prediction type's true target, whose v
    is sqrt(abar) eps - sqrt(1 - abar) x0."""
    d = ddpm(50, prediction=kind)
    x0, g = blobs(6), torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 50, (6,), generator=g), torch.randn((6, 1, 8, 8), generator=g)
    a, s = d.abar[t].sqrt().view(-1, 1, 1, 1), (1 - d.abar[t]).sqrt().view(-1, 1, 1, 1)
    target = {"eps": noise, "v": a * noise - s * x0, "x0": x0}[kind]
    torch.testing.assert_close(d.target(x0, t, noise), target)
    assert (d.loss(lambda xt, tt: d.target(x0, t, noise), x0, t, noise) == 0).all()
    assert (d.loss(lambda xt, tt: torch.zeros_like(xt), x0, t, noise) > 0).all()


@pytest.mark.parametrize("kind", ["v", "x0"])
def test_v_and_x0_models_sample_the_eps_models_images(kind):
    """DDPM and DDIM give the same images from a v (or x0) model as from its eps form."""
    torch.manual_seed(0)
    eps_d, other = ddpm(30), ddpm(30, prediction=kind)
    model = tiny_unet().eval()
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.3)
    converted, shape = as_prediction(model, eps_d, kind), (3, 1, 8, 8)
    gen = lambda: torch.Generator().manual_seed(4)
    for draw in ("ddpm_sample", "ddim_sample"):
        kw = {"steps": 10} if draw == "ddim_sample" else {}
        a = getattr(ats, draw)(eps_d, model, shape, generator=gen(), **kw)
        b = getattr(ats, draw)(other, converted, shape, generator=gen(), **kw)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The U-Net (section 2)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c, size", [(1, 8), (3, 16), (3, 32)])
def test_unet_shapes(c, size):
    """The U-Net maps (B, C, H, W) to (B, C, H, W) for several channel counts and sizes."""
    model = ats.UNet(in_ch=c, ch=32, ch_mult=(1, 2, 2), num_res=1, attn_res=(size // 2,),
                     image_size=size)
    x = torch.randn(2, c, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_cifar10_unet_has_ddpm_size():
    """The CIFAR-10 U-Net has exactly DDPM's 35,746,307 parameters and rebuilds from its config."""
    model = ats.UNet()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert ats.UNet(**model.config).config == model.config


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_without_autocast_is_exactly_f_group_norm(layout):
    """Without autocast the U-Net's GroupNorm equals F.group_norm bitwise in both memory layouts."""
    torch.manual_seed(0)
    norm = ats.norm(64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(4, 64, 8, 8).contiguous(memory_format=layout)
    expected = torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), expected)


def test_group_norm_under_autocast_keeps_dtype_and_layout():
    """Under bf16 autocast the norm returns bf16 in the input's layout, matching the fp32 norm to
    bf16 precision."""
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
    """The 4-D SDPA attention block equals softmax(q k^T / sqrt(C)) v + proj, by hand in float64."""
    torch.manual_seed(0)
    attn = ats.Attention(16)
    with torch.no_grad():
        attn.proj.weight.normal_(0, 0.3)
    x = torch.randn(2, 16, 4, 4)
    h = attn.norm(x).double()
    qkv = (torch.einsum("oc,bchw->bohw", attn.qkv.weight[:, :, 0, 0].double(), h)
           + attn.qkv.bias.double()[:, None, None])
    q, k, v = qkv.flatten(2).chunk(3, dim=1)                                    # (B, C, HW) each
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 4.0, dim=-1)         # sqrt(16) = 4
    out = torch.einsum("bij,bcj->bci", w, v).view(2, 16, 4, 4)
    projected = torch.einsum("oc,bchw->bohw", attn.proj.weight[:, :, 0, 0].double(), out)
    expected = x.double() + projected + attn.proj.bias.double()[:, None, None]
    torch.testing.assert_close(attn(x).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The sampler API and the ATS policy's probabilities (sections 3 and 4)
# ---------------------------------------------------------------------------------------------


def test_probabilities_normalised_for_extreme_ab():
    """For (a, b) over [1e-3, 1e3], extremes included, pi is finite, >= 0 and sums to 1; log-pi and
    H are finite."""
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
    """100k draws by sample() from one row of pi at fixed (a, b) pass a chi-square test against
    that row, at p > 1e-3."""
    T, n = 20, 100_000
    s = ats.AdaptiveTimestepSampler(T, vlb_fn=None, in_channels=1)
    set_ab(s, 2.0, 5.0)
    p = s.probs(torch.zeros(1, 1, 2, 2))[0]
    s.probs = lambda x0: p.expand(len(x0), T)           # the policy net once, not 100k times
    t = s.sample(torch.zeros(n, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(t, p) > 1e-3


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
    """UniformSampler draws in [0, T), is seeded, weighs every sample 1, and its update hook is a
    no-op."""
    s = ats.UniformSampler(10)
    x0 = torch.zeros(1000, 1, 2, 2)
    t = s.sample(x0, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 10 and len(t.unique()) == 10
    assert torch.equal(t, s.sample(x0, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(s.weights(t), torch.ones(1000))
    calls = []
    with s.around_update(x0, t) as stats:
        calls.append("optimizer step")
    assert calls == ["optimizer step"] and stats == {} and s.state_dict() == {}


# ---------------------------------------------------------------------------------------------
# The ATS update: probes, queue, F-scores and the policy objective (section 4)
# ---------------------------------------------------------------------------------------------


def test_reinforce_moves_mass_toward_rewarded_timesteps():
    """REINFORCE with a reward that favours small t moves mass into the first quarter of [0, T)."""
    torch.manual_seed(0)
    T = 100
    s = ats.AdaptiveTimestepSampler(T, vlb_fn=None, in_channels=1, policy_lr=1e-2)
    x0 = torch.randn(32, 1, 8, 8)
    first_quarter = lambda: s.probs(x0)[:, : T // 4].sum(1).mean().item()
    start = first_quarter()
    for _ in range(40):
        t = s.sample(x0)
        s._learn(x0, t, reward=(t < T // 4).float())
    assert start == pytest.approx(0.25, abs=0.01)
    assert first_quarter() > 0.5


def test_zero_reward_leaves_a_uniform_policy_exactly_uniform():
    """With zero reward the released objective's gradient at uniform is exactly 0: nothing moves."""
    torch.manual_seed(0)
    s = ats.AdaptiveTimestepSampler(100, vlb_fn=None, in_channels=1)
    before = {k: v.clone() for k, v in s.policy.state_dict().items()}
    x0 = torch.randn(16, 1, 8, 8)
    for _ in range(5):
        s._learn(x0, s.sample(x0), reward=torch.zeros(16))
    assert all(p.grad is None or (p.grad == 0).all() for p in s.policy.parameters())
    assert all(torch.equal(before[k], v) for k, v in s.policy.state_dict().items())


def test_entropy_term_acts_faster_than_linearly_near_uniform():
    """Near uniform the released objective's entropy gradient shrinks ~delta^3, not ~delta
    (experiments/test_lab.py compares it with a separate bonus, which shrinks ~delta)."""
    released = ats.AdaptiveTimestepSampler(200, vlb_fn=None, in_channels=1)
    ratio = entropy_gradient(released, 0.02) / entropy_gradient(released, 0.04)
    assert ratio < 0.2  # cubic gives 1/8, linear 1/2


def test_probe_is_clean_and_an_update_that_changed_nothing_is_skipped():
    """With dropout on and no model change between the probes (a warm-up's lr-0 step), the two
    probes agree exactly, so the sampler skips the update: no queue row, no policy step."""
    torch.manual_seed(0)
    d = ddpm(30)
    model = tiny_unet(dropout=0.5).train()
    s = ats_sampler(30, model, d)
    before = [p.clone() for p in s.policy.parameters()]
    x0 = blobs(8)
    with s.around_update(x0, s.sample(x0)) as stats:
        pass
    assert model.training  # restored after the probe
    assert stats == {} and len(s.queue_y) == 0 and s.updates == 0 and s.step == 1
    assert all(torch.equal(a, b) for a, b in zip(before, s.policy.parameters()))


def test_probe_sees_a_real_update():
    """With an optimizer step between the probes, the sweep deltas and rewards are non-zero."""
    torch.manual_seed(0)
    d = ddpm(30)
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


def probe_noise(sampler, seed, batch):
    """The noise the sampler's first update draws: the sweep's, then the rewards'."""
    g = torch.Generator().manual_seed(seed)
    sweep = torch.randn((len(sampler.probed), 1, 8, 8), generator=g)
    return sweep, torch.randn((batch, sampler.num_selected, 1, 8, 8), generator=g)


def spy_rewards(sampler):
    """A list that receives the reward vector of each policy step the sampler takes."""
    seen, learn = [], sampler._learn
    sampler._learn = lambda x0, t, r: (seen.append(r), learn(x0, t, r))[1]
    return seen


def test_rewards_and_sweep_are_the_vlb_drops_of_a_known_change():
    """D, summed over S, and the queued sweep delta equal vlb_terms evaluated independently
    before and after a known weight change, with the same noise, in eval mode, chunked or not."""
    torch.manual_seed(0)
    d, model = ddpm(30), tiny_unet(dropout=0.1)
    s = ats_sampler(30, model, d, seed=3, probe_batch=5)
    seen, x0 = spy_rewards(s), blobs(6)
    before = copy.deepcopy(model).eval()
    with s.around_update(x0, s.sample(x0)):
        nudge(model, 7, scale=1e-2)
    after = copy.deepcopy(model).eval()
    sweep_noise, reward_noise = probe_noise(s, 3, 6)
    drop = lambda x, t, n: (d.vlb_terms(before, x, t, n) - d.vlb_terms(after, x, t, n)).double()
    with torch.no_grad():
        ts = torch.arange(30)
        sweep = drop(x0[:1].expand(30, -1, -1, -1), ts, sweep_noise)
        D = torch.stack([drop(x0[i:i + 1].expand(3, -1, -1, -1), torch.arange(3), reward_noise[i])
                         for i in range(6)])                           # S = {0, 1, 2} at first
    torch.testing.assert_close(s.queue_x[0], sweep, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(seen[0].double(), D.sum(1), rtol=1e-4, atol=1e-7)
    assert (D != 0).all()


class Labelled(nn.Module):
    """A class-conditional eps-model: the label shifts the input, so the VLB depends on it."""

    def __init__(self, classes=4):
        super().__init__()
        self.net, self.shift = tiny_unet(), nn.Embedding(classes, 1)
        nn.init.normal_(self.shift.weight, std=1.0)

    def forward(self, x, t, y):
        return self.net(x + self.shift(y)[:, :, None, None], t)


@pytest.mark.parametrize("as_dict", [False, True])
def test_conditional_model_trains_with_each_rows_own_label(as_dict):
    """Passing the labels to around_update, vlb_fn gets for every row of every chunk (sweep and
    rewards) the label of that row's image, and the rewards equal the labelled VLB's drops; a
    class-conditional model then trains with ATS."""
    torch.manual_seed(0)
    d, model = ddpm(20), Labelled()
    B, label_of = 6, lambda x: (x[:, 0, 0, 0] * 10).round().long() % 4   # image i carries i
    x0 = 0.3 * blobs(B)
    x0[:, 0, 0, 0] = torch.arange(B) / 10
    y = torch.arange(B) % 4

    def vlb_fn(x, t, noise, cond):
        labels = cond["y"] if as_dict else cond
        assert torch.equal(labels, label_of(x)), "a row got another image's label"
        return d.vlb_terms(model, x, t, noise, y=labels)

    s = ats.AdaptiveTimestepSampler(20, vlb_fn, in_channels=1, model=model, seed=5, probe_batch=4,
                                    update_every=2)
    seen = spy_rewards(s)
    before = copy.deepcopy(model).eval()
    with s.around_update(x0, s.sample(x0), cond={"y": y} if as_dict else y):
        nudge(model, 2, scale=1e-2)
    _, reward_noise = probe_noise(s, 5, B)
    with torch.no_grad():
        expected = torch.stack([
            (d.vlb_terms(before, x0[i:i + 1].expand(3, -1, -1, -1), torch.arange(3),
                         reward_noise[i], y=y[i].expand(3))
             - d.vlb_terms(model.eval(), x0[i:i + 1].expand(3, -1, -1, -1), torch.arange(3),
                           reward_noise[i], y=y[i].expand(3))).sum() for i in range(B)])
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-7)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):
        t = s.sample(x0)
        opt.zero_grad()
        d.loss(model, x0, t, y=y).mean().backward()
        with s.around_update(x0, t, cond={"y": y} if as_dict else y):
            opt.step()
    assert s.updates == 3 and len(seen) == 3


def test_a_vlb_fn_that_breaks_its_contract_gets_one_clear_error():
    """A vlb_fn returning the wrong shape, a 0-d tensor, too few values, a Python float, a list,
    a numpy array or a tensor on another device is named at the first probe."""
    np = pytest.importorskip("numpy")
    good = lambda x, t, n: torch.zeros(len(x))
    for bad in (lambda x, t, n: good(x, t, n)[:, None], lambda x, t, n: good(x, t, n).sum(),
                lambda x, t, n: good(x, t, n)[1:], lambda x, t, n: 0.0,
                lambda x, t, n: [0.0] * len(x), lambda x, t, n: np.zeros(len(x)),
                lambda x, t, n: torch.zeros(len(x), device="meta"),
                lambda x, t, n: torch.zeros(len(x), dtype=torch.long)):
        s = ats.AdaptiveTimestepSampler(10, bad, in_channels=1)
        with pytest.raises(ValueError, match="vlb_fn must return a float tensor of shape"):
            with s.around_update(blobs(2), torch.zeros(2, dtype=torch.long)):
                pass


def test_a_vlb_fn_that_gives_nan_is_reported_and_the_policy_kept():
    """vlb_fn values of NaN skip the update with a warning, and leave the policy as it was."""
    s = ats.AdaptiveTimestepSampler(10, lambda x, t, n: torch.full((len(x),), math.nan), 1)
    before = [p.clone() for p in s.policy.parameters()]
    with pytest.warns(UserWarning, match="inf or NaN"):
        with s.around_update(blobs(2), torch.zeros(2, dtype=torch.long)):
            pass
    assert s.updates == 0 and len(s.queue_y) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, s.policy.parameters()))


def test_update_runs_every_f_s_global_steps():
    """The probe and policy step run exactly at global steps 0, f_S, 2 f_S, ...; S is updated
    from 3 rows on."""
    d = ddpm(20)
    model = tiny_unet()
    s = ats_sampler(20, model, d, update_every=4, num_selected=2)
    x0 = blobs(4)
    updated = []
    for step in range(13):
        with s.around_update(x0, s.sample(x0)) as stats:
            nudge(model, step)
        updated += [step] if stats else []
    assert s.step == 13 and len(s.queue_y) == 4 and updated == [0, 4, 8, 12]


def test_f_scores_recover_planted_timesteps():
    """With y driven by 3 known timesteps plus noise, F-score selection picks exactly those 3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 200, generator=g, dtype=torch.float64)
    X[:, 50] = 0.0  # a constant column must score 0
    noise = 0.1 * torch.randn(100, generator=g, dtype=torch.float64)
    y = 3 * X[:, 7] - 2 * X[:, 120] + 2.5 * X[:, 199] + noise
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


def recording(vlb_fn, seen):
    """vlb_fn that also records the timesteps it is asked for."""
    def fn(x0, t, noise):
        seen.append(t.clone())
        return vlb_fn(x0, t, noise)
    return fn


def updates(sampler, model, x0, n, lr=1e-3):
    """n model updates, each wrapped by the sampler as Trainer.train_step wraps it."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    diffusion = ddpm(sampler.T)
    for _ in range(n):
        t = sampler.sample(x0)
        opt.zero_grad()
        diffusion.loss(model, x0, t).mean().backward()
        with sampler.around_update(x0, t) as stats:
            opt.step()
    return stats


def test_sweep_stride_probes_only_every_kth_timestep_and_s_stays_on_them():
    """With sweep_stride k the sweep asks vlb_fn only for t = 0, k, 2k, ...; the queue has one
    column per swept t, and S only ever holds swept timesteps."""
    torch.manual_seed(0)
    T, k = 50, 7
    model, d, seen = tiny_unet(), ddpm(T), []
    vlb = recording(lambda x0, t, n: d.vlb_terms(model, x0, t, n), seen)
    s = ats.AdaptiveTimestepSampler(T, vlb, in_channels=1, model=model, update_every=1,
                                    sweep_stride=k)
    swept = set(range(0, T, k))
    assert s.S.tolist() == [0, 7, 14]
    x0 = blobs(4)
    for _ in range(6):
        updates(s, model, x0, 1)
        assert set(s.S.tolist()) <= swept and len(s.S) == 3
    asked = set(torch.cat(seen).tolist())
    assert asked == swept and s.queue_x.shape == (6, len(swept))


def test_stride_one_sweeps_every_timestep():
    """sweep_stride 1, the default and the paper's, sweeps all T timesteps."""
    torch.manual_seed(0)
    model, d, seen = tiny_unet(), ddpm(20), []
    vlb = recording(lambda x0, t, n: d.vlb_terms(model, x0, t, n), seen)
    s = ats.AdaptiveTimestepSampler(20, vlb, in_channels=1, model=model, num_selected=2)
    updates(s, model, blobs(2), 1)
    assert seen[0].tolist() == list(range(20)) and s.queue_x.shape == (1, 20)


def test_impossible_sampler_settings_are_refused_with_the_setting_named():
    """Non-integer counts, T below 2, a stride outside [1, T), too few swept timesteps for |S|,
    and a NaN learning rate each raise one ValueError naming the setting."""
    bad = [({"update_every": 1.5}, "update_every"), ({"T": 1}, "T must"), ({"T": 50.0}, "T must"),
           ({"sweep_stride": 0}, "sweep_stride"), ({"sweep_stride": 50}, "sweep_stride"),
           ({"sweep_stride": 20, "num_selected": 4}, "num_selected"),
           ({"policy_lr": math.nan}, "policy_lr"), ({"queue_size": 2}, "queue_size")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            ats.AdaptiveTimestepSampler(**{"T": 50, "vlb_fn": None, **kw})


def test_a_state_that_does_not_fit_is_refused_before_anything_changes():
    """load_state_dict refuses a state of another T, stride or |S|, an S off the swept
    timesteps, a garbled queue or a missing key, and leaves the sampler as it was."""
    torch.manual_seed(0)
    model, d = tiny_unet(), ddpm(50)
    good = ats_sampler(50, model, d, sweep_stride=5, update_every=1)
    x0 = blobs(4)
    for step in range(3):
        with good.around_update(x0, good.sample(x0)):
            nudge(model, step)
    state = good.state_dict()
    bad = [ats_sampler(60, model, ddpm(60), sweep_stride=5).state_dict(),
           ats_sampler(50, model, d, sweep_stride=10).state_dict(),
           ats_sampler(50, model, d, sweep_stride=5, num_selected=2).state_dict(),
           {**state, "S": torch.tensor([0, 5, 7])}, {**state, "queue_x": state["queue_x"][:, :3]},
           {**state, "queue_y": state["queue_y"][:1]},
           {k: v for k, v in state.items() if k != "noise_gen"}]
    target = ats_sampler(50, model, d, sweep_stride=5, update_every=1)
    before = copy.deepcopy(target.state_dict())
    for other in bad:
        with pytest.raises(ValueError, match="does not fit"):
            target.load_state_dict(other)
    after = target.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(tensors(before), tensors(after)))
    assert after["step"] == 0 and len(after["queue_y"]) == 0
    target.load_state_dict(state)
    assert target.step == 3 and len(target.queue_x) == 3
    assert torch.equal(target.queue_x, good.queue_x)


def tensors(x):
    """Every tensor inside a nested state (dicts, lists, tuples)."""
    if torch.is_tensor(x):
        return [x]
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return [t for v in values for t in tensors(v)]


def test_load_state_dict_copies_so_no_tensor_is_shared():
    """After s2.load_state_dict(s1.state_dict()) the two samplers share no tensor storage, and s2
    holds s1's values."""
    torch.manual_seed(0)
    model, d = tiny_unet(), ddpm(20)
    s1 = ats_sampler(20, model, d, update_every=1, num_selected=2)
    updates(s1, model, blobs(4), 4)
    s2 = ats_sampler(20, model, d, update_every=1, num_selected=2)
    s2.load_state_dict(s1.state_dict())
    mine, theirs = tensors(s1.state_dict()), tensors(s2.state_dict())    # both kept alive
    shared = {t.untyped_storage().data_ptr() for t in mine} & {
        t.untyped_storage().data_ptr() for t in theirs}
    assert len(mine) == len(theirs) > 10 and not shared
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_update_stats_report_how_far_the_policy_moved():
    """The stats of an update hold the rewards' mean and RMS, the KL from uniform of the policy it
    started from, and the KL of its step, equal to an independent computation on the batch."""
    torch.manual_seed(0)
    model, d = tiny_unet(), ddpm(20)
    s = ats_sampler(20, model, d, update_every=1, num_selected=2)
    x0 = blobs(8)
    updates(s, model, x0, 2)
    before = s.probs(x0).double()
    stats = updates(s, model, x0, 1)
    after = s.probs(x0).double()
    kl = (after * (after.log() - before.log())).sum(1).mean().item()
    assert stats["kl_step"] == pytest.approx(kl, rel=1e-3, abs=1e-7) and stats["kl_step"] > 0
    kl_uniform = (before * (before * 20).log()).sum(1).mean().item()
    assert stats["kl_uniform"] == pytest.approx(kl_uniform, rel=1e-3, abs=1e-6)
    assert stats["reward_rms"] >= abs(stats["reward"]) > 0


# ---------------------------------------------------------------------------------------------
# The Trainer, checkpoints and the samplers' image generation (sections 1, 5, 6)
# ---------------------------------------------------------------------------------------------


def test_training_lowers_the_loss():
    """About 100 steps on a small generated dataset lower the average loss."""
    trainer = make_trainer("uniform")
    losses = [loss.item() for loss in trainer.run(batches(blobs(256), 32, 0), 120)]
    assert trainer.step == 120 and len(losses) == 120
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_uniform_unweighted_step_is_the_plain_ddpm_step():
    """Uniform unweighted t trains bit-identically to a hand-written DDPM step (Adam, clip, EMA)."""
    trainer = make_trainer("uniform")
    torch.manual_seed(0)
    model, d = tiny_unet(), ddpm(50)
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
        ema = [p.detach().clone() if i == 0 else e.lerp(p.detach(), 0.1)
               for e, p in zip(ema, model.parameters())]
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
    pairs = zip(trainer.ema.parameters(), reference.module.parameters())
    assert all(torch.equal(a, b) for a, b in pairs)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    """save_checkpoint then load restores model, EMA, optimizers, sampler, generator, step; UNet
    rebuilds from it."""
    trainer = make_trainer("ats")
    list(trainer.run(batches(blobs(64), 8, 0), 7))
    path = tmp_path / "ckpt.pt"
    ats.save_checkpoint(path, trainer, {"lr": 2e-3})
    ckpt = ats.load_checkpoint(path)
    assert (ckpt["config"] == {"lr": 2e-3} and ckpt["step"] == 7
            and not (tmp_path / "ckpt.pt.tmp").exists())
    fresh = make_trainer("ats", seed=1)
    fresh.load_state_dict(ckpt)
    pairs = [(trainer.model, fresh.model), (trainer.ema, fresh.ema),
             (trainer.sampler.policy, fresh.sampler.policy)]
    for a, b in pairs:
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert torch.equal(fresh.sampler.queue_x, trainer.sampler.queue_x)
    assert (torch.equal(fresh.sampler.S, trainer.sampler.S)
            and fresh.sampler.step == trainer.sampler.step)
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
    """A trainer built with new learning rates keeps them after loading a state saved with other
    rates."""
    old = make_trainer("ats")
    list(old.run(batches(blobs(64), 8, 0), 3))
    state = old.state_dict()
    torch.manual_seed(0)
    model, d = tiny_unet(), ddpm(50)
    sampler = ats_sampler(50, model, d, update_every=3, policy_lr=0.5)
    new = ats.Trainer(model, d, sampler, lr=0.25, warmup=5)
    new.load_state_dict(state)
    assert (new.opt.param_groups[0]["lr"] == pytest.approx(0.25 * 4 / 5)
            and new.sched.base_lrs == [0.25])
    assert new.sampler.opt.param_groups[0]["lr"] == 0.5
    new.train_step(blobs(8))
    assert new.opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_bad_checkpoint_files_give_one_clear_error(tmp_path):
    """Missing, truncated, foreign and old-version files each raise CheckpointError naming the
    problem."""
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
    with pytest.raises(ats.CheckpointError, match="version 1, this code reads version 3"):
        ats.load_checkpoint(tmp_path / "v1.pt")


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_shape_range_and_determinism(method):
    """DDPM and DDIM return the right shape and range, the same images under the same seed, and an
    image's noise depends on its own generator only, not on the batch it is in."""
    torch.manual_seed(0)
    d = ddpm(40)
    model = tiny_unet().eval()
    with torch.no_grad():  # a non-trivial output layer, so samples are not just noise
        model.conv_out.weight.normal_(0, 0.3)
    if method == "ddpm":
        draw = lambda g, n=3: ats.ddpm_sample(d, model, (n, 1, 8, 8), generator=g)
    else:
        draw = lambda g, n=3: ats.ddim_sample(d, model, (n, 1, 8, 8), steps=10, eta=0.5,
                                              generator=g)
    x = draw(torch.Generator().manual_seed(1))
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, draw(torch.Generator().manual_seed(1)))
    assert not torch.equal(x, draw(torch.Generator().manual_seed(2)))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together, apart = draw(gens([5, 6, 7])), torch.cat([draw(gens([5, 6]), 2), draw(gens([7]), 1)])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Several processes (gloo on CPU)
# ---------------------------------------------------------------------------------------------


SWEEPS = [(7, 1), (25, 4), (10, 1)]        # swept timesteps 7, 7 and 10: none divides by 3


def sweep_setup(T, stride=1):
    torch.manual_seed(0)
    model = tiny_unet().eval()
    s = ats_sampler(T, model, ddpm(T), sweep_stride=stride, num_selected=2)
    g = torch.Generator().manual_seed(1)
    return s, blobs(1), torch.randn((len(s.probed), 1, 8, 8), generator=g)


def labelled_update(rank):
    """One conditional sampler update on this rank's own images and labels."""
    torch.manual_seed(0)
    d, model = ddpm(20), Labelled()
    s = ats.AdaptiveTimestepSampler(20, lambda x, t, n, y: d.vlb_terms(model, x, t, n, y=y),
                                    in_channels=1, model=model, probe_batch=3)
    x0, y = blobs(4, seed=10 + rank), (torch.arange(4) + rank) % 4
    with s.around_update(x0, s.sample(x0), cond=y):
        nudge(model, 5, scale=1e-2)
    return s


def _ranks_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        sweeps = [sweep_setup(T, stride) for T, stride in SWEEPS]
        s = labelled_update(rank)
        torch.save({"sweeps": [sw.sweep(x, noise) for sw, x, noise in sweeps],
                    "policy": s.policy.state_dict(), "queue": s.queue_x, "S": s.S},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_three_ranks_agree_with_one_process(tmp_path):
    """Under 3 gloo processes: a sweep split over the ranks equals one process's (with swept
    timesteps not divisible by 3, every or every 4th t); after a conditional update on different
    images and labels per rank, every rank holds the same policy, queue and S, and the queued
    sweep is rank 0's image with rank 0's label."""
    mp.spawn(_ranks_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for (T, stride), sweep in zip(SWEEPS, ranks[0]["sweeps"]):
        s, x_star, noise = sweep_setup(T, stride)
        torch.testing.assert_close(sweep, s.sweep(x_star, noise), rtol=1e-5, atol=1e-7)
    for r in ranks[1:]:
        assert all(torch.equal(r["policy"][k], ranks[0]["policy"][k]) for k in r["policy"])
        assert torch.equal(r["queue"], ranks[0]["queue"]) and torch.equal(r["S"], ranks[0]["S"])
    alone = labelled_update(0)                    # one process, rank 0's images: the same sweep
    torch.testing.assert_close(ranks[0]["queue"], alone.queue_x, rtol=0, atol=1e-6)  # chunking


# ---------------------------------------------------------------------------------------------
# The README's copy-the-sampler snippet
# ---------------------------------------------------------------------------------------------


def test_readme_loops_run_on_exactly_the_copied_block():
    """The README's loop and its conditional variant run on the copied block alone, with the
    user's own objects (betas, a model, a loader, an optimizer) and nothing of ats.py."""
    loop, conditional = readme_snippets()[:2]
    assert loop.strip().startswith("from ats import AdaptiveTimestepSampler, GaussianDiffusion")
    loop = loop.replace("in_channels=3", "in_channels=1").split("\n", 1)[1]
    torch.manual_seed(0)
    model = tiny_unet()
    user = {"betas": torch.linspace(1e-4, 0.02, 40), "model": model, "device": "cpu",
            "loader": [blobs(4), blobs(4, seed=1)],
            "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}
    scope = {**copied(), **user}
    exec(loop, scope)
    assert type(scope["sampler"]) is scope["AdaptiveTimestepSampler"]
    assert scope["sampler"].step == 2 and len(scope["sampler"].queue_y) == 1
    labelled = Labelled()
    scope.update(model=labelled, loader=[(blobs(4), torch.tensor([0, 1, 2, 3]))],
                 optimizer=torch.optim.Adam(labelled.parameters(), lr=1e-3))
    exec(conditional.replace("in_channels=3", "in_channels=1"), scope)
    assert scope["sampler"].updates == 1


class TheirDiffusion:
    """A stand-in for improved-diffusion's and DiT's GaussianDiffusion, with their signatures
    (q_sample, _vb_terms_bpd, training_losses, num_timesteps) and this project's maths inside."""

    def __init__(self, T):
        self.num_timesteps, self.ours = T, ddpm(T)

    def q_sample(self, x_start, t, noise=None):
        return self.ours.q_sample(x_start, t, noise)

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        noise = (x_t - self.ours._at(self.ours.sqrt_abar, t, x_t) * x_start) / self.ours._at(
            self.ours.sqrt_1m_abar, t, x_t)
        return {"output": self.ours.vlb_terms(model, x_start, t, noise, **model_kwargs)}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        return {"loss": self.ours.loss(model, x_start, t, noise, **model_kwargs)}


def test_readme_recipe_for_improved_diffusion_and_dit_passes_each_rows_label():
    """The improved-diffusion/DiT recipe runs on the copied block with a stand-in of their
    diffusion, a DDP-like wrapper and a class-conditional model."""
    recipe = readme_snippets()[4]
    assert "_vb_terms_bpd" in recipe
    torch.manual_seed(0)
    wrapper = nn.Module()
    wrapper.module = Labelled()
    wrapper.forward = lambda x, t, y: wrapper.module(x, t, y)
    scope = {**copied(), "diffusion": TheirDiffusion(30), "model": wrapper, "device": "cpu",
             "loader": [(blobs(4), torch.tensor([3, 2, 1, 0]))] * 2,
             "opt": torch.optim.Adam(wrapper.module.parameters(), lr=1e-3)}
    exec(recipe.replace("in_channels=4", "in_channels=1"), scope)
    assert scope["net"] is wrapper.module and scope["sampler"].updates == 1
