"""What ATS costs per step against uniform sampling, and the training throughput of the fast path.

    python -m experiments.speed                    # per-step cost of ATS over uniform
    python -m experiments.speed --device cuda      # ... and images/s per setting, with a profile
    python -m experiments.speed --quick --device cpu

Uniform and ATS cycles of f_S steps are interleaved after a warm-up cycle each; the report splits
ATS's extra time into the probes and the policy net, and compares it with counting forwards.
"""

import argparse
import dataclasses
import math
import os
import statistics

import torch

import ats
import train
from experiments.common import (
    build,
    device_name,
    make_config,
    parse_overrides,
    random_batch,
    timer,
)

# -------------------------------------------------------------------------------------------------
# speed: per-step wall time of uniform vs ATS, interleaved, amortised over full f_S cycles
# -------------------------------------------------------------------------------------------------


def speed(args, device):
    """Interleave uniform and ATS cycles (A B A B) after a warm-up cycle each; print the breakdown.
    """
    over = {"T": args.T, "batch_size": args.batch_size, "update_every": args.update_every,
            "num_selected": args.num_selected, "sweep_stride": args.sweep_stride}
    over = {key: value for key, value in over.items() if value is not None}
    if args.quick:  # a small-size path for CPU; explicit flags still win
        over = {"T": 200, "batch_size": 16, "update_every": 10, **over}
    cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
    time_it, every = timer(device), cfg.update_every
    trainers = {s: build(dataclasses.replace(cfg, sampler=s), device) for s in ("uniform", "ats")}
    x0 = random_batch(cfg, device)
    cycle = lambda trainer: [time_it(lambda: trainer.train_step(x0)) for _ in range(every)]
    for trainer in trainers.values():                               # warm-up; probe step first
        cycle(trainer)
    cycles = {name: [] for name in trainers}
    for _ in range(args.cycles):
        for name, trainer in trainers.items():
            cycles[name].append(cycle(trainer))
    policy = trainers["ats"].sampler
    policy_s = statistics.median(time_it(lambda: policy.sample(x0)) for _ in range(20))
    result = report_speed(cfg, cycles, policy_s, device)
    if args.profile and not args.throughput:  # else the last throughput row is profiled
        save_profile(trainers["ats"], x0, args.profile, device, every, "one f_S cycle of ATS")
    return result


def report_speed(cfg, cycles, policy_s, device):
    """Print and return the per-step medians, the ratio and where ATS's extra time goes."""
    per_step = {n: statistics.median(sum(c) / len(c) for c in cs) for n, cs in cycles.items()}
    ordinary = statistics.median(t for c in cycles["ats"] for t in c[1:])
    uniform = statistics.median(t for c in cycles["uniform"] for t in c)
    probe = statistics.median((c[0] - statistics.median(c[1:] or [0.0])) / sum(c)
                              for c in cycles["ats"])
    B, T, f_S, k, stride = (cfg.batch_size, cfg.T, cfg.update_every, cfg.num_selected,
                            cfg.sweep_stride)
    fwd = 2 * (math.ceil(T / stride) + B * k) / (f_S * 3 * B)
    out = {"device": device_name(device), "T": T, "B": B, "f_S": f_S, "S": k, "stride": stride,
           "uniform_s": per_step["uniform"], "ats_s": per_step["ats"],
           "ratio": per_step["ats"] / per_step["uniform"], "probe_share": probe,
           "policy_ms_ordinary_step": 1e3 * (ordinary - uniform),
           "policy_ms_forward": 1e3 * policy_s,
           "probe_forward_overhead": fwd, "cycles": len(cycles["ats"])}
    print(f"speed on {out['device']}, torch {torch.__version__}: T={T} B={B} f_S={f_S} |S|={k} "
          f"sweep stride {stride}, "
          f"{out['cycles']} interleaved cycles of {f_S} steps each after warm-up")
    print(f"  median time per step  uniform {1e3 * out['uniform_s']:.1f} ms   "
          f"ats {1e3 * out['ats_s']:.1f} ms (amortised over full f_S cycles, probes included)")
    print(f"  ratio ats/uniform     {out['ratio']:.3f}")
    print(f"  probe share of ats    {100 * probe:.1f}% of its cycle time (probe before/after + "
          f"policy update), i.e. +{100 * probe * out['ratio']:.1f}% over uniform; counting "
          f"forwards predicts +{100 * fwd:.1f}% = 2(ceil(T/k)+B|S|)/(3B f_S)")
    print(f"  policy net, ordinary  {out['policy_ms_ordinary_step']:+.2f} ms per step (ats minus "
          f"uniform median), policy forward + draw alone {out['policy_ms_forward']:.2f} ms")
    return out


# -------------------------------------------------------------------------------------------------
# throughput: images/s of uniform training, one row per step of the fast path, and a profile
# -------------------------------------------------------------------------------------------------

# Dense peak TFLOP/s (bf16, fp32 with TF32) from NVIDIA datasheets; the first name found wins.
PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494),
               "A100": (312, 156), "L40S": (362, 183), "L4": (121, 60), "A10G": (70, 35)}

# (label, amp, channels_last, compile): eager baselines, then the fast path one step at a time.
SETTINGS = [("eager bf16, NCHW", "bf16", False, False),
            ("eager fp32+TF32, NCHW", "none", False, False),
            ("bf16 + channels_last", "bf16", True, False),
            ("bf16 + channels_last + compile", "bf16", True, True),
            ("eager bf16, NCHW (again)", "bf16", False, False)]


def throughput(cfg, device, warmup, steps, try_compile, profile_path):
    """Images/s of uniform training per setting (cuDNN autotuning and fused Adam are on for every
    CUDA row)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 already
    name = device_name(device)
    peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    flops = flops_per_image(cfg, device)
    print(f"throughput on {name}, torch {torch.__version__}, B={cfg.batch_size}, {warmup} warm-up "
          f"and {steps} timed steps per row; {flops / 1e9:.1f} GFLOP per image (fwd+bwd); dense "
          "peak " + (f"bf16 {peak[0]} / tf32 {peak[1]} TFLOP/s" if peak else "unknown here"))
    rows = []
    for label, amp, channels_last, compiled in SETTINGS:
        if compiled and not try_compile:
            continue
        try:
            setting = dataclasses.replace(cfg, sampler="uniform", amp=amp, compile=compiled)
            trainer = train.build(setting, device, channels_last=channels_last)
            x0 = random_batch(cfg, device)
            for _ in range(warmup):
                trainer.train_step(x0)
            seconds = timer(device)(lambda t=trainer, x=x0: [t.train_step(x) for _ in range(steps)])
        except Exception as e:  # a failing setting (a compile toolchain, say) costs only its row
            print(f"  {label:34s} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        ips = cfg.batch_size * steps / seconds
        tflops = flops * ips / 1e12
        frac = f"{100 * tflops / peak[0 if amp == 'bf16' else 1]:5.1f}% of peak" if peak else ""
        print(f"  {label:34s} {ips:9.1f} images/s {tflops:7.2f} TFLOP/s {frac}")
        rows.append({"label": label, "amp": amp, "channels_last": channels_last,
                     "compile": compiled, "images_s": ips, "tflops": tflops})
    if profile_path and rows:
        save_profile(trainer, x0, profile_path, device, 10, "the last row")
    return rows


def flops_per_image(cfg, device):
    """FLOPs of one training step of the U-Net (forward and backward) per image, as torch counts.
    """
    from torch.utils.flop_counter import FlopCounterMode
    trainer = build(dataclasses.replace(cfg, sampler="uniform", amp="none"), device)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(random_batch(cfg, device))
    return counter.get_total_flops() / cfg.batch_size


def check_profile_path(path):
    """Refuse, before any timing, a --profile file that could not be written."""
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if path and (os.path.isdir(path) or not os.path.isdir(folder)
                 or not os.access(folder, os.W_OK)):
        raise SystemExit(f"error: --profile {path}: "
                         + ("it is a folder" if os.path.isdir(path) else
                            f"the folder {folder} does not exist or is not writable")
                         + ": give a file in a writable folder, or --profile '' for none")


def save_profile(trainer, x0, path, device, steps, what):
    """The top kernels of `steps` training steps, as torch.profiler's text table. When the profiler
    records nothing twice (these CUDA wheels' kineto can fail to start on a machine without a
    GPU), cProfile's top functions of the same steps instead, saying so in the file and here."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    note, table = " (torch.profiler recorded no events, twice: cProfile's table instead)", None
    for _ in range(2):
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step(x0)
        if len(prof.key_averages()):
            note, table = "", prof.key_averages().table(sort_by=key, row_limit=30)
            break
    if table is None:
        import cProfile
        import io
        import pstats
        profiler, out = cProfile.Profile(), io.StringIO()
        profiler.runcall(lambda: [trainer.train_step(x0) for _ in range(steps)])
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        table = out.getvalue()
    with open(path, "w") as f:
        f.write(f"{device_name(device)}, torch {torch.__version__}, {steps} steps of {what}"
                f"{note}\n{table}")
    print(f"  profile of {what}: {path}{note}")



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto takes the GPU when there is one")
    p.add_argument("--set", default="", help="train.Config overrides, e.g. ch=64,dropout=0")
    p.add_argument("--preset", default=None, help="model preset (default: cifar10 on CUDA, tiny)")
    p.add_argument("--T", type=int, help="diffusion steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    p.add_argument("--update-every", type=int, help="f_S, steps between sampler updates")
    p.add_argument("--num-selected", type=int, help="|S|, timesteps in the reward")
    p.add_argument("--sweep-stride", type=int, help="k, the probe sweeps every k-th timestep")
    p.add_argument("--cycles", type=int, default=3, help="timed f_S cycles per sampler")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU check")
    p.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure images/s of training per setting (default: on CUDA only)")
    p.add_argument("--tp-warmup", type=int, default=10, help="warm-up steps per throughput row")
    p.add_argument("--tp-steps", type=int, default=50, help="timed steps per throughput row")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="in the throughput table, also try torch.compile")
    p.add_argument("--profile", default="",
                   help="write a torch.profiler table of the last throughput row, or without "
                        "--throughput of one f_S cycle of ATS, to this file")
    args = p.parse_args(argv)
    if args.cycles < 1 or args.tp_steps < 1 or args.tp_warmup < 0:
        raise SystemExit("error: --cycles and --tp-steps must be at least 1, --tp-warmup >= 0")
    if args.preset is not None and args.preset not in train.PRESETS:
        raise SystemExit(f"error: unknown --preset {args.preset!r}: choose from "
                         f"{', '.join(train.PRESETS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = ats.pick_device(args.device)
    check_profile_path(args.profile)
    args.preset = args.preset or ("cifar10" if device.type == "cuda" else "tiny")
    if args.throughput is None:
        args.throughput = device.type == "cuda"
    result = speed(args, device)
    if args.throughput:
        over = {"batch_size": args.batch_size} if args.batch_size else {}
        cfg = make_config(args.preset, {**over, **parse_overrides(args.set)})
        result["throughput"] = throughput(cfg, device, args.tp_warmup, args.tp_steps,
                                          args.compile, args.profile)
    return result


if __name__ == "__main__":
    main()
