"""examples/: ATS in a diffusers training loop. Skipped without diffusers (and scikit-learn, for
the example's digits). CPU only."""

import importlib.util
import os

import pytest
import torch

import ats
from conftest import HERE

diffusers = pytest.importorskip("diffusers", reason="the diffusers example needs diffusers")

TINY = ["--batch-size", "4", "--channels", "8,16", "--update-every", "2", "--log-every", "2",
        "--warmup", "2"]


def example():
    """examples/diffusers_ats.py as a module."""
    path = os.path.join(HERE, "examples", "diffusers_ats.py")
    spec = importlib.util.spec_from_file_location("diffusers_ats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_counts_optimizer_steps_under_accumulation_and_resumes(tmp_path, capsys):
    """With 3 micro-batches per optimizer step the sampler's step counter equals the optimizer
    steps, it updates every f_S of them, and a second call continues from the saved state."""
    pytest.importorskip("sklearn")
    run = example().main
    run(["--steps", "4", "--accumulate", "3", "--out", str(tmp_path), *TINY])
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["sampler"]["step"] == 4
    assert state["sampler"]["updates"] == 2 and len(state["sampler"]["queue_y"]) == 2
    run(["--steps", "6", "--accumulate", "3", "--out", str(tmp_path), *TINY])
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["sampler"]["step"] == 6 and state["sampler"]["updates"] == 3
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 6/6" in out and "quarters [" in out
    with pytest.raises(SystemExit, match="other settings"):
        run(["--steps", "8", "--accumulate", "2", "--out", str(tmp_path), *TINY])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_example_vlb_is_ours_for_the_schedulers_betas(kind):
    """The example's vlb_fn for a diffusers UNet2DModel equals GaussianDiffusion.vlb_terms of the
    same model converted to eps by hand; diffusers' add_noise and get_velocity are our q_sample and
    v target, so the two codebases agree on what the model predicts."""
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(3)                                        # a model that predicts something
    ours = ats.GaussianDiffusion(betas=scheduler.betas, prediction=example().PREDICTION[kind])
    vlb = lambda x0, t, noise: ours.vlb_terms(lambda x, s: unet(x, s).sample, x0, t, noise)
    eps = ats.GaussianDiffusion(betas=scheduler.betas.double(), prediction="eps")

    def as_eps(x, t):                                        # v -> eps by the exact identity
        out = unet(x, t).sample.double()
        if kind == "epsilon":
            return out.float()
        a = eps.sqrt_abar.double()[t].view(-1, 1, 1, 1)
        s = eps.sqrt_1m_abar.double()[t].view(-1, 1, 1, 1)
        return (s * x.double() + a * out).float()

    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    for step in (0, 1, 500, 999):
        t = torch.full((4,), step)
        with torch.no_grad():
            torch.testing.assert_close(vlb(x0, t, noise), eps.vlb_terms(as_eps, x0, t, noise),
                                       rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scheduler.add_noise(x0, noise, t), ours.q_sample(x0, t, noise))
        if kind == "v_prediction":
            torch.testing.assert_close(scheduler.get_velocity(x0, noise, t),
                                       ours.target(x0, t, noise))
