"""baselines.py: the loss weightings and timestep samplers ATS is compared with. CPU only."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import baselines
import train
from conftest import TINY_CFG, batches, blobs, chi2_pvalue, free_port, linear_abar

# ---------------------------------------------------------------------------------------------
# Loss weightings and table samplers, against float64 values computed here
# ---------------------------------------------------------------------------------------------


def test_min_snr_weights():
    """Min-SNR weights are min(SNR, 5)/SNR; on linear T=1000 they are exactly 1 from t=130 on,
    w[0] ~ 5.0e-4."""
    abar = linear_abar(1000)
    snr = abar / (1 - abar)
    w = baselines.loss_weights("min-snr", abar)
    torch.testing.assert_close(w.double(), snr.clamp(max=5.0) / snr, rtol=1e-6, atol=0)
    assert (w[130:] == 1).all() and (w[:130] < 1).all()
    assert w[0].item() == pytest.approx(5 * 1e-4 / (1 - 1e-4), rel=1e-5)


def test_min_snr_equals_x0_space_loss():
    """w_t ||eps - eps_hat||^2 equals min(SNR_t, gamma) ||x0 - x0_hat||^2 for x0_hat derived from
    eps_hat."""
    abar, g = linear_abar(1000), torch.Generator().manual_seed(0)
    t = torch.arange(0, 1000, 37)
    x0, eps, eps_hat = (torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
                        for _ in range(3))
    a = abar[t].view(-1, 1, 1, 1)
    x0_hat = (a.sqrt() * x0 + (1 - a).sqrt() * eps - (1 - a).sqrt() * eps_hat) / a.sqrt()
    w = baselines.loss_weights("min-snr", abar).double()[t]
    lhs = w * ((eps - eps_hat) ** 2).flatten(1).mean(1)
    rhs = (abar[t] / (1 - abar[t])).clamp(max=5.0) * ((x0 - x0_hat) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=0)


def test_p2_and_speed_weights():
    """P2 with k = gamma = 1 is 1 - abar_t; SpeeD's weight rescales d(1 - abar)/dt to [0.4, 0.6]
    below 700, 1 above."""
    abar = linear_abar(1000)
    torch.testing.assert_close(baselines.loss_weights("p2", abar), (1 - abar).float())
    f = 1 - abar
    g = torch.cat([f[1:2] - f[:1], (f[2:] - f[:-2]) / 2, f[-1:] - f[-2:-1]])  # np.gradient, by hand
    expected = 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min())
    expected[700:] = 1
    torch.testing.assert_close(baselines.loss_weights("speed", abar), expected.float())
    assert baselines.loss_weights("none", abar) is None
    with pytest.raises(ValueError, match="min-snr"):
        baselines.loss_weights("snr+1", abar)


def test_lognormal_table():
    """Log-normal probabilities are >= 0, sum to 1, and the bin holding exp(P_mean) straddles the
    CDF's 0.5."""
    abar = linear_abar(1000)
    p = baselines.lognormal_probs(abar, -1.2, 1.2)
    assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-12
    sigma = ((1 - abar) / abar).sqrt()
    t = int((sigma.log() + 1.2).abs().argmin())  # the bin of sigma = exp(P_mean)
    assert p[:t].sum() <= 0.5 <= p[: t + 1].sum()


def test_speed_table():
    """SpeeD's table puts k = 5 times the mass on t < 700 as on t >= 700 and sums to 1."""
    p = baselines.speed_probs(1000)
    assert (abs(p.sum().item() - 1) < 1e-12 and (p[:700] == 5 * p[700]).all()
            and (p[700:] == p[700]).all())


def warm_lsm(T=20, history=10):
    """A LossSecondMomentSampler fed `history` losses for every t, and those losses [T, history]."""
    s = baselines.LossSecondMomentSampler(T, history=history)
    t = torch.arange(T).repeat(history)
    noise = torch.rand(len(t), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    losses = (t.double() + 1) * (0.5 + noise)
    with s.around_update(None, t, losses):
        pass
    return s, losses.view(history, T).T


@pytest.mark.parametrize("name", ["uniform", "lognormal", "speed", "loss-second-moment"])
def test_table_samplers_match_their_probabilities(name):
    """Seeded draws of every heuristic sampler pass a chi-square test against its stated
    probabilities."""
    T = 20
    s = (warm_lsm(T)[0] if name == "loss-second-moment"
         else baselines.make_sampler(name, T, linear_abar(1000)[::50]))
    t = s.sample(torch.zeros(20_000, 1), generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(t, s.probs()) > 1e-3


def test_loss_second_moment_sampler():
    """Uniform with weight 1 before warm-up; then p = (1-u) L_t / sum L + u/T for constant losses,
    and unbiased."""
    T, u = 20, 0.001
    s = baselines.LossSecondMomentSampler(T, history=3, uniform_prob=u)
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
    make = lambda: baselines.make_sampler(name, 20, linear_abar(1000)[::50])
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



@pytest.mark.parametrize("sampler, weighting", [("ats", "none"), ("uniform", "min-snr"),
                                                ("lognormal", "p2"), ("speed", "speed"),
                                                ("loss-second-moment", "none")])
def test_every_sampler_and_weighting_trains_under_bf16(sampler, weighting):
    """Each sampler and weighting takes finite bf16-autocast steps on CPU; the loss train_step
    returns (the one train.py logs) is the unweighted mean L_simple, and the weighted loss is the
    one optimised."""
    cfg = train.Config(**{**TINY_CFG, "sampler": sampler, "weighting": weighting, "amp": "bf16"})
    trainer = train.build(cfg, torch.device("cpu"))
    assert trainer.amp_dtype == torch.bfloat16
    seen, loss_fn = [], trainer.diffusion.loss
    trainer.diffusion.loss = lambda *a, **k: seen.append(loss_fn(*a, **k)) or seen[-1]
    for loss in trainer.run(batches(blobs(32), 8, 0), 3):
        assert torch.isfinite(loss)
        assert loss == seen[-1].detach().mean()                       # unweighted, exactly
    weights = baselines.loss_weights(weighting, trainer.diffusion.abar.cpu())
    if weights is not None:
        assert not torch.allclose(weights, torch.ones_like(weights))  # a weighting that matters
        assert torch.equal(trainer.loss_weights.cpu(), weights)


def _lsm_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        s = baselines.LossSecondMomentSampler(10, history=3)
        for step in range(4):
            g = torch.Generator().manual_seed(100 * rank + step)
            with s.around_update(None, torch.randint(0, 10, (6,), generator=g),
                                 torch.rand(6, generator=g) + rank):
                pass
        torch.save(s.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_loss_second_moment_histories_agree_across_ranks(tmp_path):
    """Two gloo ranks fed different losses hold one history: every rank's losses, in rank order."""
    mp.spawn(_lsm_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = baselines.LossSecondMomentSampler(10, history=3)
    for step in range(4):
        gens = [torch.Generator().manual_seed(100 * r + step) for r in range(2)]
        draws = [(torch.randint(0, 10, (6,), generator=g), torch.rand(6, generator=g) + r)
                 for r, g in enumerate(gens)]
        t = torch.cat([d[0] for d in draws])
        losses = torch.cat([d[1] for d in draws])
        with reference.around_update(None, t, losses):
            pass
    for state in states:
        assert (torch.equal(state["losses"], reference.losses)
                and torch.equal(state["counts"], reference.counts))


