"""What a run draws: the ATS sampler's record and its heatmap, the sample grids, the samples FID
scores over training, and the metrics plot. matplotlib is optional: without it the heatmap is a
bare image and the plots are skipped. train.py and bench.py both draw with these.
"""

import json
import math
import os

import torch
import torch.distributed as dist
import torchvision

import ats

HEAT = torch.tensor([[0.0, 0.0, 0.0], [0.45, 0.0, 0.55], [1.0, 0.45, 0.0], [1.0, 1.0, 0.7]])


class SamplerLog:
    """Where the ATS policy put its mass: the last update's summary, and a thinned history of
    pi(t) for the heatmap."""

    def __init__(self, rows, state=None):
        self.rows, self.history, self.steps, self.every, self.summary = rows, [], [], 1, {}
        if state:
            self.history, self.steps = list(state["history"]), list(state["steps"])
            self.every, self.summary = state["every"], state["summary"]

    def record(self, step, stats, update_every):
        """Keep the update's summary, and every `every`-th update's pi(t); halve when full."""
        p, T = stats["p"], len(stats["p"])
        t, q = torch.arange(T), T / 4
        quarters = [round(float(p[(t >= i * q) & (t < (i + 1) * q)].sum()), 3) for i in range(4)]
        self.summary = {"mean_t": float((p * t).sum()), "S": stats["S"],
                        "reward": stats["reward"], "quarters": quarters,
                        "reward_rms": stats["reward_rms"], "kl_step": stats["kl_step"],
                        "kl_uniform": stats["kl_uniform"], "last_in_S": T - 1 in stats["S"]}
        if step // update_every % self.every == 0:
            self.history.append(p)
            self.steps.append(step)
            if len(self.history) > self.rows:
                self.history, self.steps = self.history[::2], self.steps[::2]
                self.every *= 2

    def state_dict(self):
        """The summary and the heatmap history, for the checkpoint's extra."""
        return {"history": self.history, "steps": self.steps, "every": self.every,
                "summary": self.summary}


def to_uint8(x):
    """Samples in [-1, 1] -> uint8 [0, 255], rounded as torchvision's save_image rounds."""
    return ((x.float() + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def save_grid(cfg, trainer, path):
    """EMA samples by DDIM, from the same noise every time so that grids compare across steps."""
    shape = (cfg.sample_n, cfg.channels, cfg.image_size, cfg.image_size)
    with ats.autocast(trainer.device, cfg.amp):
        x = ats.ddim_sample(trainer.diffusion, trainer.ema, shape, steps=cfg.sample_steps,
                                          generator=torch.Generator().manual_seed(cfg.seed))
    torchvision.utils.save_image((x.float() + 1) / 2, path, nrow=math.ceil(math.sqrt(cfg.sample_n)))


@torch.no_grad()
def fid_samples(cfg, trainer, rank, world):
    """cfg.fid_n EMA samples by DDIM, image i from the noise of (seed, i) alone, split over the
    ranks and gathered: uint8 (fid_n, C, H, W) on every rank."""
    per = math.ceil(cfg.fid_n / world)
    mine = range(rank * per, min((rank + 1) * per, cfg.fid_n))
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    out = torch.zeros((per, *shape), dtype=torch.uint8, device=trainer.device)
    for start in range(0, len(mine), cfg.fid_batch):
        index = mine[start:start + cfg.fid_batch]
        with ats.autocast(trainer.device, cfg.amp):
            x = ats.ddim_sample(trainer.diffusion, trainer.ema, (len(index), *shape),
                                              steps=cfg.sample_steps,
                                              generator=ats.image_generators(cfg.seed, index))
        out[start:start + len(index)] = to_uint8(x)
    if world > 1:
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out)
        out = torch.cat(parts)
    return out[:cfg.fid_n].cpu()


def save_heatmap(history, path, height, spread, steps=None):
    """pi(t) over training: rows are sampler updates (first at the top), columns t.

    The colour is log(pi(t) T) on [-log spread, log spread]: uniform is mid-ramp, brighter likelier.
    With matplotlib the picture gets axes (t; the training step of each row when `steps` is given),
    a colour scale and a title; without it, the bare image, `height` pixels tall.
    """
    p = torch.stack(history).float()                                     # (updates, T)
    plt = pyplot()
    if plt is None:
        v = ((p * p.shape[1]).log() / math.log(spread) + 1) / 2          # 0.5 = uniform
        pos = v.clamp(0, 1) * (len(HEAT) - 1)                            # place on the ramp
        i = pos.floor().long().clamp(max=len(HEAT) - 2)
        w = (pos - i)[..., None]
        rgb = (HEAT[i] * (1 - w) + HEAT[i + 1] * w).permute(2, 0, 1)     # (3, updates, T)
        rgb = torch.nn.functional.interpolate(rgb[None], size=(height, p.shape[1]),
                                              mode="nearest")[0]
        torchvision.utils.save_image(rgb, path)
        return
    T, rows = p.shape[1], p.shape[0]
    first, last = (steps[0], steps[-1]) if steps else (1, rows)
    last = max(last, first + 1)                                          # one row: still a band
    import matplotlib.colors as colors  # installed, since pyplot() found it

    fig, ax = plt.subplots(figsize=(8, 1.5 + height / 100))
    image = ax.imshow((p * T).clamp(1 / spread, spread).numpy(), aspect="auto",
                      interpolation="nearest", extent=(-0.5, T - 0.5, last, first),
                      cmap=colors.LinearSegmentedColormap.from_list("heat", HEAT.tolist()),
                      norm=colors.LogNorm(1 / spread, spread))
    ax.set(xlabel=f"timestep t (0: almost clean, {T - 1}: almost pure noise)",
           ylabel="training step" if steps else "sampler update",
           title=f"ATS policy over training: batch-mean pi(t), {rows} of its updates")
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_ticks([1 / spread, 1, spread], labels=[f"{1 / spread:g}x", "uniform", f"{spread:g}x"])
    bar.set_label("pi(t) relative to uniform 1/T")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot on its file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_metrics(out_dir):
    """metrics.png from log.jsonl: the training loss, and FID and KID when there are any."""
    plt = pyplot()
    if plt is None:
        return                                           # said once, at start-up
    records = read_log(os.path.join(out_dir, "log.jsonl"))
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fids = [(r["step"], r["fid"], r["kid"]) for r in records if "fid" in r]
    fig, axes = plt.subplots(1 + bool(fids), 1, figsize=(7, 6 if fids else 3.5), squeeze=False)
    if losses:
        axes[0][0].plot(*zip(*losses))
    axes[0][0].set(xlabel="step", ylabel="L_simple, mean per log interval", yscale="log")
    if fids:
        steps, fid_values, kid_values = zip(*fids)
        ax = axes[1][0]
        ax.plot(steps, fid_values, marker="o", label="FID")
        ax.set(xlabel="step", ylabel="FID (EMA weights)")
        twin = ax.twinx()
        twin.plot(steps, kid_values, marker="s", color="tab:orange", label="KID")
        twin.set_ylabel("KID")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=100)
    plt.close(fig)


def read_log(path):
    """The records of log.jsonl; a line cut short by a crash is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
