"""ATS in lucidrains' denoising-diffusion-pytorch: its GaussianDiffusion trains at the timesteps
ATS draws, and its Trainer steps the sampler and saves its state beside every checkpoint.

    pip install -e . denoising-diffusion-pytorch
    python examples/lucidrains_ats.py path/to/images --steps 1000 --out runs/lucidrains

The package's forward takes the timesteps (`diffusion(img, times=t)`), so its own loss, checks
and options stay in use. It samples with the posterior variance, so the VLB that ATS's reward
needs is ats.GaussianDiffusion's with var_type="small", built from its betas and objective.
"""

import argparse

import torch

try:
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    import ats
except ImportError as e:
    raise SystemExit(f"error: this example needs {e.name}: pip install -e . "
                     "denoising-diffusion-pytorch") from None

PREDICTION = {"pred_noise": "eps", "pred_v": "v", "pred_x0": "x0"}


class ATSDiffusion(GaussianDiffusion):
    """lucidrains' diffusion with t drawn by ATS; it keeps the images and timesteps of the
    micro-batches since the last optimizer step, for the sampler's update."""

    def forward(self, img, *args, **kwargs):
        x0 = self.normalize(img)                         # the sampler sees x0 in [-1, 1]
        t = self.sampler.sample(x0)
        self.seen.append((x0, t))
        return super().forward(img, *args, times=t, **kwargs)


class ATSTrainer(Trainer):
    """lucidrains' Trainer whose optimizer step is wrapped by the sampler's update, once per
    step whatever the accumulation, and whose checkpoints carry the sampler's state."""

    def __init__(self, diffusion, *args, ats_options=None, **kwargs):
        super().__init__(diffusion, *args, **kwargs)
        bound = ats.GaussianDiffusion(diffusion.betas, prediction=PREDICTION[diffusion.objective],
                                      var_type="small").to(self.device)
        vlb_fn = lambda x0, t, noise: bound.vlb_terms(diffusion.model, x0, t, noise)
        diffusion.sampler = ats.AdaptiveTimestepSampler(
            diffusion.num_timesteps, vlb_fn, diffusion.channels, model=diffusion.model,
            device=self.device, **(ats_options or {}))
        diffusion.seen, step = [], self.opt.step

        def step_with_ats(*a, **k):
            x0, t = (torch.cat(v) for v in zip(*diffusion.seen))
            diffusion.seen.clear()
            with diffusion.sampler.around_update(x0, t):
                return step(*a, **k)
        self.opt.step, self.diffusion = step_with_ats, diffusion

    def save(self, milestone):
        super().save(milestone)
        if self.accelerator.is_local_main_process:
            torch.save(self.diffusion.sampler.state_dict(),
                       str(self.results_folder / f"ats-{milestone}.pt"))

    def load(self, milestone):
        super().load(milestone)
        path = str(self.results_folder / f"ats-{milestone}.pt")
        self.diffusion.sampler.load_state_dict(torch.load(path, weights_only=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder of at least 100 images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=32, help="the Unet's base width")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", type=int, default=None, help="the milestone to continue from")
    p.add_argument("--update-every", type=int, default=20, help="ATS f_S")
    p.add_argument("--sweep-stride", type=int, default=10, help="ATS probes every k-th t")
    p.add_argument("--out", default="runs/lucidrains")
    args = p.parse_args(argv)
    unet = Unet(dim=args.dim, dim_mults=(1, 2))
    diffusion = ATSDiffusion(unet, image_size=args.image_size, timesteps=1000)
    trainer = ATSTrainer(diffusion, args.folder, train_batch_size=args.batch_size,
                         train_num_steps=args.steps, save_and_sample_every=args.save_every,
                         results_folder=args.out, calculate_fid=False, num_samples=4,
                         ats_options={"update_every": args.update_every,
                                      "sweep_stride": args.sweep_stride})
    if args.resume is not None:
        trainer.load(args.resume)
    trainer.train()


if __name__ == "__main__":
    main()
