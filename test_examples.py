"""examples/: ATS in a diffusers training loop, GaussianDiffusion.from_diffusers, and the fp32
probes of a model that accelerate prepared for mixed precision. Skipped without diffusers (and
scikit-learn, for the example's digits; accelerate, for its test). CPU only."""

import fcntl
import importlib.util
import math
import os
import signal

import pytest
import torch

import ats
from conftest import HERE, blobs, copied, nudge, readme_snippets, tiny_unet

diffusers = pytest.importorskip("diffusers", reason="the diffusers example needs diffusers")

TINY = ["--batch-size", "4", "--channels", "8,16", "--update-every", "2", "--log-every", "2",
        "--warmup", "2", "--sweep-stride", "50"]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """accelerate keeps one process-wide state; a test's Accelerator must not outlive it."""
    yield
    if importlib.util.find_spec("accelerate") is not None:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)


def example():
    """examples/diffusers_ats.py as a module."""
    path = os.path.join(HERE, "examples", "diffusers_ats.py")
    spec = importlib.util.spec_from_file_location("diffusers_ats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_counts_optimizer_steps_skips_the_lr0_update_and_resumes(tmp_path, capsys):
    """With 3 micro-batches per optimizer step the sampler counts optimizer steps; its update at
    step 0, where the warm-up's lr is 0, changes nothing and is skipped; a second call continues
    (a changed --log-every is fine), and a changed model setting is refused by name."""
    pytest.importorskip("sklearn")
    run = example().main
    run(["--steps", "4", "--accumulate", "3", "--out", str(tmp_path), *TINY])
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["sampler"]["step"] == 4
    assert state["sampler"]["updates"] == 1 and len(state["sampler"]["queue_y"]) == 1
    run(["--steps", "6", "--accumulate", "3", "--out", str(tmp_path), *TINY, "--log-every", "3"])
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["sampler"]["step"] == 6 and state["sampler"]["updates"] == 2
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 6/6" in out and "quarters [" in out
    with pytest.raises(SystemExit, match="other settings \\(accumulate\\)"):
        run(["--steps", "8", "--accumulate", "2", "--out", str(tmp_path), *TINY])


def test_example_guards_the_users_work(tmp_path, monkeypatch, capsys):
    """Bad flags are refused before anything runs; a second run into a busy --out is refused; a
    NaN loss stops without writing state.pt; SIGINT finishes the step, saves and exits 130."""
    pytest.importorskip("sklearn")
    module = example()
    a_file = tmp_path / "file"
    a_file.write_text("")
    for bad in (["--warmup", "-5"], ["--channels", "16,abc"], ["--lr", "nan"],
                ["--out", str(a_file)]):
        with pytest.raises(SystemExit):
            module.main([*TINY, "--out", str(tmp_path / "x"), *bad])
        assert "error:" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="another run is using"):
            module.main(["--steps", "2", "--out", str(busy), *TINY])
    with monkeypatch.context() as m:
        m.setattr(module.F, "mse_loss", lambda out, target: out.mean() * math.nan)
        with pytest.raises(SystemExit, match="the loss became nan at step 0"):
            module.main(["--steps", "2", "--out", str(tmp_path / "nan"), *TINY])
    assert not (tmp_path / "nan" / "state.pt").exists()
    steps = []
    adamw_step = torch.optim.AdamW.step

    def interrupted(self, *a, **k):  # Ctrl-C arrives during the third optimizer step
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return adamw_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    before = signal.getsignal(signal.SIGINT)      # SIG_IGN when the suite runs in the background
    with pytest.raises(SystemExit) as stop:
        module.main(["--steps", "10", "--out", str(tmp_path / "sig"), *TINY])
    assert stop.value.code == 130
    assert torch.load(tmp_path / "sig" / "state.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before


def tiny_diffusers_unet(scale=3.0):
    """A small UNet2DModel whose output is not near zero."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=8,
                                 down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(scale)                                    # a model that predicts something
    return unet


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_from_diffusers_reads_the_schedulers_betas_prediction_and_variance(kind, variance):
    """from_diffusers gives the scheduler's own reverse variance for t >= 1 (its _get_variance),
    its add_noise and v target, and a VLB equal to that of the same model converted to eps by
    hand; a learned variance is refused."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=kind,
                                        variance_type=variance)
    ours = ats.GaussianDiffusion.from_diffusers(scheduler)
    ts = torch.arange(1, 1000, 37)
    theirs = torch.stack([scheduler._get_variance(int(t)) for t in ts]).log()
    torch.testing.assert_close(ours.model_logvar[ts], theirs.float(), rtol=1e-4, atol=1e-4)
    unet = tiny_diffusers_unet()
    vlb = lambda x0, t, noise: ours.vlb_terms(lambda x, s: unet(x, s).sample, x0, t, noise)
    eps = ats.GaussianDiffusion(scheduler.betas.double(), var_type=ours.config["var_type"])

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
    with pytest.raises(ValueError, match="learned"):
        ats.GaussianDiffusion.from_diffusers(diffusers.DDPMScheduler(variance_type="learned"))


def test_accelerate_bf16_model_is_probed_in_fp32_through_its_forward_taken_before_prepare():
    """accelerate's prepare(mixed_precision='bf16') makes the model's forward enter autocast by
    itself. Through the forward taken before prepare (the README's recipe) the rewards equal an
    fp32 copy's exactly, and training still runs in bf16; through the prepared forward they do
    not."""
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate")
    model = tiny_unet()
    fp32_forward = model.forward                                 # taken before prepare
    copy = tiny_unet()
    copy.load_state_dict(model.state_dict())
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    prepared = accelerator.prepare(model)
    d = ats.GaussianDiffusion(ats.make_betas("linear", 40))

    def rewards(forward, module):
        torch.manual_seed(0)
        vlb = lambda x0, t, noise: d.vlb_terms(forward, x0, t, noise)
        s = ats.AdaptiveTimestepSampler(40, vlb, in_channels=1, model=module)
        seen = []
        learn = s._learn
        s._learn = lambda x0, t, r: (seen.append(r), learn(x0, t, r))[1]
        x0, weights = blobs(8), {k: v.clone() for k, v in module.state_dict().items()}
        with s.around_update(x0, s.sample(x0)):
            nudge(module, 1)
        module.load_state_dict(weights)                          # back where it was
        return seen[0]

    fp32 = rewards(copy, copy)
    assert torch.equal(rewards(fp32_forward, model), fp32)
    assert not torch.equal(rewards(prepared, model), fp32)


def test_lucidrains_trainer_draws_t_by_ats_steps_it_once_per_step_and_saves_its_state(tmp_path):
    """examples/lucidrains_ats.py: the package's Trainer, with 2 micro-batches per optimizer step,
    trains at ATS's timesteps, updates the sampler at every f_S-th optimizer step on the
    accumulated batch, and a checkpoint's milestone restores the sampler's state."""
    pytest.importorskip("denoising_diffusion_pytorch", reason="needs denoising-diffusion-pytorch")
    from PIL import Image
    spec = importlib.util.spec_from_file_location(
        "lucidrains_ats", os.path.join(HERE, "examples", "lucidrains_ats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(100):
        pixels = (blobs(1, size=16, seed=i)[0, 0].expand(3, 16, 16).permute(1, 2, 0) + 1) * 127.5
        Image.fromarray(pixels.byte().numpy()).save(images / f"{i}.png")
    torch.manual_seed(0)
    diffusion = module.ATSDiffusion(module.Unet(dim=8, dim_mults=(1, 2)), image_size=16,
                                    timesteps=100, sampling_timesteps=5)
    trainer = module.ATSTrainer(diffusion, str(images), train_batch_size=8,
                                gradient_accumulate_every=2, train_num_steps=4,
                                save_and_sample_every=4, results_folder=str(tmp_path / "out"),
                                calculate_fid=False, num_samples=4,
                                ats_options={"update_every": 2, "sweep_stride": 10})
    s, drawn, sample, learned = diffusion.sampler, [], diffusion.sampler.sample, []
    s.sample = lambda x0, *a: drawn.append(sample(x0, *a)) or drawn[-1]
    learn = s._learn
    s._learn = lambda x0, t, r: (learned.append(len(r)), learn(x0, t, r))[1]
    trainer.train()
    assert len(drawn) == 8 and s.step == 4 and s.updates == 2 and learned == [16, 16]
    saved = torch.load(tmp_path / "out" / "ats-1.pt", weights_only=True)
    assert saved["step"] == 4 and torch.equal(saved["queue_x"], s.queue_x)
    fresh = module.ATSTrainer(module.ATSDiffusion(module.Unet(dim=8, dim_mults=(1, 2)),
                                                  image_size=16, timesteps=100),
                              str(images), train_batch_size=8, gradient_accumulate_every=2,
                              results_folder=str(tmp_path / "out"), calculate_fid=False,
                              num_samples=4, ats_options={"update_every": 2, "sweep_stride": 10})
    fresh.load(1)
    assert fresh.diffusion.sampler.step == 4
    assert torch.equal(fresh.diffusion.sampler.queue_x, s.queue_x)


def test_readme_diffusers_recipe_runs_on_the_copied_block_with_a_prepared_bf16_unet():
    """The README's diffusers lines, on the copied block alone, build a sampler whose probes of
    a UNet2DModel that accelerate prepared for bf16 run in fp32, and it updates."""
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate")
    recipe = readme_snippets()[2]
    assert "from_diffusers" in recipe
    unet = tiny_diffusers_unet(scale=1.0)
    scope = {**copied(), "noise_scheduler": diffusers.DDPMScheduler(num_train_timesteps=100),
             "unet": unet, "device": "cpu"}
    exec(recipe, scope)
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    sampler, x0 = scope["sampler"], blobs(4)
    t = sampler.sample(x0)
    noise = torch.randn(x0.shape)
    with accelerator.autocast():
        loss = torch.nn.functional.mse_loss(
            unet(scope["noise_scheduler"].add_noise(x0, noise, t), t).sample, noise)
    accelerator.backward(loss)
    with sampler.around_update(x0, t):
        optimizer.step()
    assert sampler.updates == 1 and scope["diffusion"].config["var_type"] == "small"


def test_readme_lucidrains_recipe_runs_on_the_copied_block():
    """The README's lucidrains loop runs on the copied block alone with the package's own
    GaussianDiffusion, its forward taking the sampler's timesteps."""
    lucid = pytest.importorskip("denoising_diffusion_pytorch",
                                reason="needs denoising-diffusion-pytorch")
    torch.manual_seed(0)
    diffusion = lucid.GaussianDiffusion(lucid.Unet(dim=8, dim_mults=(1, 2)), image_size=8,
                                        timesteps=50)
    scope = {**copied(), "diffusion": diffusion, "device": "cpu",
             "loader": [(blobs(4).expand(4, 3, 8, 8) + 1) / 2] * 2,
             "optimizer": torch.optim.Adam(diffusion.parameters(), lr=1e-3)}
    exec(readme_snippets()[3], scope)
    assert scope["sampler"].step == 2 and scope["sampler"].updates == 1
