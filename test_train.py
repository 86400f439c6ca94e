"""train.py: config and flags, data, outputs and resume, the run's safety, FID over training, and
several processes under torchrun. CPU only."""

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from PIL import Image

import ats
import pictures
import safety
import sample
import train
from conftest import (
    HERE,
    TINY,
    TINY_CFG,
    fid_unavailable,
    free_port,
    log_records,
    poison,
    real_images,
    run,
    use_stand_in_fid,
)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["sampler"], b["sampler"]
    for name in sa["policy"]:
        assert torch.equal(sa["policy"][name], sb["policy"][name]), f"policy.{name} differs"
    assert torch.equal(sa["S"], sb["S"]) and torch.equal(sa["queue_x"], sb["queue_x"])
    assert sa["step"] == sb["step"] and a["step"] == b["step"]


def torchrun(out, *extra, steps="100000"):
    """train.py under torchrun with 2 gloo workers, in the background; far intervals by default."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(free_port()), os.path.join(HERE, "train.py"), *TINY, "--out-dir", str(out),
           "--steps", steps, "--log-every", steps, "--ckpt-every", steps, "--sample-every", steps,
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def wait_for(path, seconds=120):
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


# -------------------------------------------------------------------------------------------------
# Config and flags
# -------------------------------------------------------------------------------------------------


def test_preset_then_explicit_flag():
    """Defaults < preset < explicit flag, for numbers and for --flag/--no-flag booleans."""
    assert train.parse_config([]) == train.Config()
    cfg = train.parse_config(["--preset", "tiny", "--steps", "7", "--no-hflip"])
    assert cfg.steps == 7 and not cfg.hflip and cfg.ch == train.PRESETS["tiny"]["ch"]
    assert train.parse_config(["--steps", "7", "--preset", "tiny"]).steps == 7


def test_help_lists_every_setting_with_its_default(capsys):
    """--help exits 0 and lists every Config field as a flag with its default, the presets and the
    flags that may change on --resume."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f"[{f.default}]" in text, f.name
    assert "presets: cifar10 = the defaults; tiny = dataset=synthetic" in text
    assert "On --resume only these may change: --amp" in text


@pytest.mark.parametrize("flags, match", [
    (["--batch-size", "0"], "--batch-size 0 must be a positive multiple"),
    (["--T", "1"], "T must be in [2, 100000]"), (["--T", "1000000000"], "T must be in [2, 100000]"),
    (["--num-selected", "60"], "num_selected (|S|) must be in [1, 50], the number of swept"),
    (["--update-every", "0"], "update_every (f_S) and probe_batch must be at least 1"),
    (["--lr", "nan"], "lr must be in (0, 1]"), (["--lr", "1e308"], "lr must be in (0, 1]"),
    (["--policy-lr", "-1"], "policy_lr must be in (0, 1]"),
    (["--policy-lr", "1e308"], "policy_lr must be in (0, 1]"),
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 2^62)"),
    (["--sample-n", "1000000"], "--sample-n is the grid's size, at most 1024"),
    (["--heatmap-height", "100000000"], "--heatmap-height must be at most 4096"),
    (["--image-size", "-4"], "image_size must be at least 1"),
    (["--ch-mult", ""], "ch_mult needs positive multipliers"),
    (["--ch-mult", "1,x"], "--ch-mult expects comma-separated integers"),
    (["--ch-mult", "1,,2"], "--ch-mult expects comma-separated integers"),
    (["--attn-res", "7"], "attn_res (7,) names sizes no level has"),
    (["--ch", "15"], "ch must be an even number"), (["--dropout", "1.5"], "dropout must be in"),
    (["--sample-steps", "99"], "--sample-steps: DDIM steps must be in [1, T=50]"),
    (["--sampler", "lognormal", "--lognormal-std", "0"], "--lognormal-std must be positive"),
    (["--lognormal-std", "nan"], "--lognormal-std must be positive"),
    (["--snr-gamma", "0"], "--snr-gamma must be positive"),
    (["--weighting", "min-snr", "--prediction", "v"], "is written for eps-prediction"),
    (["--snr-gamma", "nan"], "--snr-gamma must be positive"),
    (["--fid-every", "2", "--fid-n", "3"], "--fid-n must be at least 4"),
    (["--fid-every", "2"], "--fid-every on --dataset synthetic needs --fid-ref"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/x"], "does not exist")])
def test_bad_flags_give_one_error_line_and_create_nothing(tmp_path, flags, match):
    """Every impossible setting exits with one 'error:' line before anything is written."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", *flags)
    assert e.value.code.startswith("error:") and match in e.value.code, e.value.code
    assert "\n" not in e.value.code and not (tmp_path / "run").exists()


def test_bad_out_dirs_give_one_error_line(tmp_path):
    """An out-dir that is a file, under a file or empty is refused with one line."""
    (tmp_path / "file").write_text("x")
    for out, match in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot be "
                                                          "created or written"), ("", "empty")):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, "--out-dir", str(out), "--steps", "2"])
        assert e.value.code.startswith("error:") and match in e.value.code, e.value.code


@pytest.mark.parametrize("flags, match", [
    (["--ch", "1000000"], "lower --ch, --ch-mult, --num-res, --image-size or --T"),
    (["--synthetic-n", "1000000000"], "lower --synthetic-n or --image-size")])
def test_sizes_that_cannot_fit_give_one_line(tmp_path, flags, match):
    """A model or dataset too large to allocate is one line naming the flags to lower, and
    nothing is written."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", *flags)
    assert e.value.code.startswith("error: out of memory (it asked for ") and match in e.value.code
    assert "\n" not in e.value.code and not (tmp_path / "run").exists()


def test_an_allocation_that_fails_in_training_names_the_flag(tmp_path, monkeypatch):
    """Out of memory in a training step, a grid or the heatmap: one line, the flag to lower."""
    def no_memory(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for target, match in (("save_grid", "lower --sample-n"),
                          ("save_heatmap", "lower --heatmap-height")):
        with monkeypatch.context() as m:
            m.setattr(train, target, no_memory)
            with pytest.raises(SystemExit) as e:
                run(tmp_path / target, "--steps", "4", "--sample-every", "4")
        assert e.value.code == f"error: out of memory (it asked for 2.00 GiB): {match}"
    with monkeypatch.context() as m:
        m.setattr(ats.GaussianDiffusion, "loss", no_memory)
        with pytest.raises(SystemExit, match="lower --batch-size, --ch or --image-size, or "
                                             "--probe-batch$"):
            run(tmp_path / "step", "--steps", "4")


def test_a_policy_that_diverges_stops_without_saving(tmp_path, monkeypatch):
    """If the ATS policy's weights become inf or NaN, the run stops with one line before any
    checkpoint holds them, and the last good checkpoint stays."""
    run(tmp_path, "--steps", "4", "--ckpt-every", "4")
    before = (tmp_path / "ckpt.pt").read_bytes()
    learn = ats.AdaptiveTimestepSampler._learn

    def poisoned(self, *args):
        next(self.policy.parameters()).data.fill_(float("nan"))
        return learn(self, *args)
    monkeypatch.setattr(ats.AdaptiveTimestepSampler, "_learn", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "12", "--ckpt-every", "1", "--resume")
    assert re.match(r"error: at step \d+ the policy's weights became inf or NaN", e.value.code)
    assert "Resume with a lower --policy-lr" in e.value.code
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_a_signal_while_starting_is_one_line(sig):
    """Ctrl-C, SIGHUP (a closed terminal) or SIGTERM while the script still imports torch: exit
    130 and one line naming the signal, no traceback and no silent death with 129 or 143."""
    for script in ("train.py", "sample.py"):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--help"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        maps, deadline = f"/proc/{proc.pid}/maps", time.time() + 60
        while "libtorch" not in open(maps).read() and time.time() < deadline:
            time.sleep(0.005)            # until torch's libraries load: the handler is set before
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (script, proc.returncode, err)
        assert err.startswith(f"interrupted while starting ({sig.name})") and err.count("\n") == 1


def test_train_cli_error_has_no_traceback(tmp_path):
    """Run as a script, a bad flag gives exit code 1 and one line, not a traceback."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--batch-size", "0",
                             "--out-dir", str(tmp_path / "r")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.startswith("error:")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_flags_this_run_never_reads_are_warned(tmp_path, capsys):
    """A flag given explicitly that this run does not read (--snr-gamma without min-snr, the
    lognormal flags without lognormal, ATS flags with another sampler) gets one warning line
    naming it and what uses it; flags that are read get none."""
    out = ["--out-dir", str(tmp_path)]
    train.configure(["--sampler", "uniform", "--snr-gamma", "3", "--lognormal-std", "2",
                     "--policy-lr", "0.1", "--max-kl", "0.5", *out])
    assert capsys.readouterr().err.splitlines() == [
        "warning: --snr-gamma does nothing in this run: only --weighting min-snr uses it",
        "warning: --lognormal-std does nothing in this run: only --sampler lognormal uses it",
        "warning: --policy-lr does nothing in this run: only --sampler ats uses it",
        "warning: --max-kl does nothing in this run: only --sampler ats uses it"]
    train.configure(["--weighting", "min-snr", "--snr-gamma", "3", "--policy-lr", "0.1", *out])
    train.configure(["--sampler", "lognormal", "--lognormal-mean", "0", *out])
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


def test_cifar10_without_data_or_network_gives_clear_error(tmp_path, monkeypatch):
    """With no local CIFAR-10 and a failing download, one message names the fixes."""
    def no_network(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
                    "--device", "cpu", "--ch", "16", "--ch-mult", "1,2", "--num-res", "1"])
    assert "CIFAR-10" in e.value.code and "--dataset synthetic" in e.value.code
    assert not (tmp_path / "run").exists()


def test_cifar10_is_decoded_into_one_uint8_tensor(monkeypatch):
    """CIFAR-10's (N, 32, 32, 3) array becomes a (N, 3, S, S) uint8 tensor, resized if S != 32."""
    arrays = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data = arrays.numpy()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    full = train.make_dataset(train.Config())
    assert full.dtype == torch.uint8 and torch.equal(full, arrays.permute(0, 3, 1, 2))
    assert train.make_dataset(train.Config(image_size=16)).shape == (5, 3, 16, 16)


def test_folder_dataset_reads_resizes_and_names_a_corrupt_file(tmp_path):
    """--dataset folder reads images resized and cropped; a corrupt file stops training with one
    line naming it, whether the data is decoded on the device or streamed by workers."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), "red").save(tmp_path / "a.png")
    Image.new("L", (9, 30)).save(tmp_path / "sub" / "b.jpg")
    data = train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path), image_size=8))
    assert len(data) == 2 and all(data[i].shape == (3, 8, 8) for i in range(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path / "empty"),
                                        image_size=8))
    for i in range(14):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for on_device, workers in (("yes", "0"), ("no", "0"), ("no", "1")):
        with pytest.raises(SystemExit, match=r"error: cannot read image .*broken\.png"):
            run(tmp_path / f"out{on_device}{workers}", "--dataset", "folder", "--data-dir",
                str(tmp_path), "--on-device", on_device, "--workers", workers, "--channels", "3",
                "--steps", "8")


def test_an_image_claiming_to_be_huge_is_named(tmp_path):
    """A PNG whose header claims 30000x30000 pixels (PIL's decompression-bomb guard) is an
    unreadable image like any other, named in one line."""
    Image.new("L", (8, 8)).save(tmp_path / "bomb.png")
    png = bytearray((tmp_path / "bomb.png").read_bytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2                  # IHDR width and height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # a valid header checksum
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    data = train.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path),
                                           image_size=8))
    with pytest.raises(train.UnreadableImage, match=r"cannot read image .*bomb\.png"):
        data[0]


def test_resident_data_gives_the_dataloader_batches():
    """Batches indexed from a resident tensor equal the DataLoader's, epoch after epoch, from any
    step."""
    cfg = train.Config(**{**TINY_CFG, "workers": 0})
    data = train.synthetic_shapes(20, 8, 1, seed=0)
    dataset = [data[i] for i in range(len(data))]
    cpu = torch.device("cpu")
    for start in (0, 3):
        a = train.batches(cfg, data, train.batch_indices(20, 4, 0, 1, 0, start), cpu)
        b = train.batches(cfg, dataset, train.batch_indices(20, 4, 0, 1, 0, start), cpu)
        for _ in range(12):  # three epochs of 5 batches
            assert torch.equal(next(a), next(b))


def test_synthetic_data_is_deterministic_and_structured():
    """The same seed gives the same images, another seed others, and images are not flat noise."""
    a, b = train.synthetic_shapes(8, 16, 3, seed=0), train.synthetic_shapes(8, 16, 3, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 16, 16)
    assert torch.equal(a, train.synthetic_shapes(8, 16, 3, seed=0)) and not torch.equal(a, b)
    x = a.float()
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.5 * (x - x.mean()).abs().mean()


def test_a_corrupt_cifar10_archive_is_named_as_corrupt(tmp_path, monkeypatch):
    """A cifar-10-python.tar.gz whose MD5 is wrong (cut short by a failed download) is named as
    corrupt, with the fix (delete it), not reported as a download that failed."""
    def no_network(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b half an archive")
    with pytest.raises(SystemExit) as e:
        train.make_dataset(train.Config(data_dir=str(tmp_path)))
    assert e.value.code == (f"error: {tmp_path / 'cifar-10-python.tar.gz'} is corrupt (its MD5 is "
                            "not CIFAR-10's): delete it and run again to download it, or put a "
                            "good copy there")


# -------------------------------------------------------------------------------------------------
# Outputs and resume
# -------------------------------------------------------------------------------------------------


def test_train_writes_its_outputs(tmp_path):
    """A short tiny run writes ckpt, grids, log, heatmap, metrics plot and config."""
    ckpt = run(tmp_path, "--steps", "4")
    assert ckpt["step"] == 4 and ckpt["config"]["ch"] == 16 and ckpt["unet"]["ch"] == 16
    for name in ("ckpt.pt", "grid_0000004.png", "log.jsonl", "sampler.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "img_per_s", "sampler"} <= set(records[-1])
    assert "quarters" in records[-1]["sampler"]
    assert json.loads((tmp_path / "config.json").read_text()) == {**ckpt["config"], "ckpt_step": 4}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "metrics.png").is_file()


def test_the_heatmap_has_axes_with_matplotlib_and_is_bare_without(tmp_path, monkeypatch):
    """sampler.png: a figure with axes and a colour scale when matplotlib is there; else the bare
    image, one column per t and --heatmap-height rows, uniform drawn as the ramp's middle."""
    uniform, peaked = torch.full((50,), 1 / 50), torch.softmax(torch.arange(50.0) / 5, 0)
    history = [uniform] * 3 + [peaked] * 3
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # import fails
    pictures.save_heatmap(history, tmp_path / "bare.png", 40, 10.0)
    bare = torchvision.transforms.functional.pil_to_tensor(Image.open(tmp_path / "bare.png"))
    assert bare.shape == (3, 40, 50)
    middle = (pictures.HEAT[1] + pictures.HEAT[2]) / 2 * 255                   # the ramp at 0.5
    assert (bare[:, 0].float().T - middle).abs().max() <= 1               # first rows: uniform
    assert bare[:, -1, -1].float().mean() > bare[:, -1, 0].float().mean()  # likelier is brighter
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    pictures.save_heatmap(history, tmp_path / "figure.png", 256, 10.0, steps=[2, 4, 6, 8, 10, 12])
    width, height = Image.open(tmp_path / "figure.png").size
    assert width > 50 and height > 256                     # the image plus axes, title and scale


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopping at step 3 and resuming to 6 gives bit-identical weights, EMA and sampler state."""
    whole = run(tmp_path / "whole", "--steps", "6")
    run(tmp_path / "split", "--steps", "3")
    resumed = run(tmp_path / "split", "--steps", "6", "--resume")
    assert_same_state(whole, resumed)
    assert [r["step"] for r in log_records(tmp_path / "split")] == [2, 4, 6]


def test_resume_restores_the_sampler_summary(tmp_path):
    """The first log line after a resume carries the policy's summary before the next update."""
    run(tmp_path, "--steps", "4", "--update-every", "3")                 # updates at steps 1 and 4
    run(tmp_path, "--steps", "5", "--update-every", "3", "--resume", "--log-every", "1")
    last = log_records(tmp_path)[-1]
    assert last["step"] == 5 and "quarters" in last["sampler"] and "mean_t" in last["sampler"]


def test_resume_applies_or_refuses_changed_flags(tmp_path):
    """On --resume, --lr takes effect; a run-defining flag that differs is refused, naming both
    values, with nothing written."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    before = {n: (tmp_path / n).read_bytes() for n in ("ckpt.pt", "config.json", "log.jsonl")}
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


def test_v_prediction_run_trains_resumes_bit_identically_and_samples(tmp_path):
    """A --prediction v run with --sweep-stride 5 trains, resumes bit-identically, refuses a
    changed --prediction or --sweep-stride on resume, and sample.py rebuilds it from its
    checkpoint alone."""
    flags = ["--prediction", "v", "--sweep-stride", "5"]
    whole = run(tmp_path / "whole", "--steps", "6", *flags)
    run(tmp_path / "split", "--steps", "3", *flags)
    for changed, match in [(["--prediction", "eps"], "--prediction eps differs"),
                           (["--sweep-stride", "1"], "--sweep-stride 1 differs")]:
        with pytest.raises(SystemExit, match=match):
            run(tmp_path / "split", "--steps", "6", "--resume", *changed)
    assert_same_state(whole, run(tmp_path / "split", "--steps", "6", "--resume"))
    assert whole["diffusion"]["prediction"] == "v" and whole["sampler"]["sweep_stride"] == 5
    assert set(whole["sampler"]["S"].tolist()) <= set(range(0, 50, 5))
    records = log_records(tmp_path / "whole")
    assert records[-1]["loss"] < records[0]["loss"]
    sample.main(["--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--n", "4", "--steps", "3",
                 "--grid", str(tmp_path / "v.png"), "--device", "cpu"])
    assert Image.open(tmp_path / "v.png").size[0] > 8


def test_config_json_holds_what_the_checkpoint_holds(tmp_path):
    """A resume that diverges before its first save leaves config.json as ckpt.pt's config."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    with pytest.raises(SystemExit, match="stopped without saving|diverged; not saved"):
        run(tmp_path, "--steps", "6", "--resume", "--lr", "1")
    stored = ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["config"]
    assert json.loads((tmp_path / "config.json").read_text()) == {**stored, "ckpt_step": 2}
    assert stored["lr"] == 1e-3


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs, nothing catches it."""


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path, monkeypatch):
    """A run killed after logging step 3 (checkpoint at 2) resumes with a log of each step once."""
    step = ats.Trainer.train_step

    def dies_at_step_4(self, x0):
        if self.step == 3:
            raise Killed
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", dies_at_step_4)
    with pytest.raises(Killed):
        run(tmp_path, "--steps", "10", "--log-every", "1")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')                                     # a line cut short, too
    assert [r["step"] for r in pictures.read_log(tmp_path / "log.jsonl")] == [1, 2, 3]
    monkeypatch.undo()
    run(tmp_path, "--steps", "5", "--log-every", "1", "--resume")
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3, 4, 5]


def test_fresh_run_refuses_to_overwrite(tmp_path):
    """Starting a fresh run into an out-dir that holds ckpt.pt stops and names --resume."""
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, "--steps", "2")


def test_config_json_is_ckpt_pts_again_after_a_kill_between_the_two_writes(tmp_path,
                                                                            monkeypatch):
    """Killed after ckpt.pt is replaced and before config.json is: config.json's ckpt_step shows
    that it lags, and the next start rewrites it from ckpt.pt before its first step."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    write = safety.write_config

    def killed_after_ckpt_4(out_dir, config, step):
        if step == 4:
            raise Killed
        write(out_dir, config, step)

    def killed(*_):
        raise Killed
    monkeypatch.setattr(safety, "write_config", killed_after_ckpt_4)
    with pytest.raises(Killed):
        run(tmp_path, "--steps", "4", "--resume", "--lr", "3e-3")
    ckpt, config = ats.load_checkpoint(str(tmp_path / "ckpt.pt")), json.loads(
        (tmp_path / "config.json").read_text())
    assert ckpt["step"] == 4 and ckpt["config"]["lr"] == 3e-3
    assert config["ckpt_step"] == 2 and config["lr"] == 1e-3      # lags, and says so
    monkeypatch.undo()
    monkeypatch.setattr(ats.Trainer, "train_step", killed)
    with pytest.raises(Killed):                                   # the next start, killed at once
        run(tmp_path, "--steps", "6", "--resume")
    assert json.loads((tmp_path / "config.json").read_text()) == {**ckpt["config"], "ckpt_step": 4}


@pytest.mark.parametrize("log", ["folder", "not utf-8"])
def test_a_log_that_is_a_folder_or_not_utf8_is_no_traceback(tmp_path, log):
    """A log.jsonl that is a folder stops the run with one line before any step; one with bytes
    that are not UTF-8 loses those lines as if a crash had cut them, and the run resumes."""
    run(tmp_path, "--steps", "2", "--log-every", "1")
    if log == "folder":
        (tmp_path / "log.jsonl").unlink()
        (tmp_path / "log.jsonl").mkdir()
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--steps", "4", "--resume")
        assert e.value.code == (f"error: cannot read {tmp_path / 'log.jsonl'} (Is a directory): "
                                "it is not this run's log; move it away, then run again")
        return
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": "\xff\xfe"}\n')
    run(tmp_path, "--steps", "3", "--log-every", "1", "--resume")
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3]


# -------------------------------------------------------------------------------------------------
# The run's safety: locks, divergence, signals, failed writes
# -------------------------------------------------------------------------------------------------


def test_a_live_run_holds_its_out_dir(tmp_path):
    """While a live run holds the out-dir, a second --resume, or a fresh run into a folder whose
    run has not saved yet, is refused with one line and writes nothing; the lock file a finished
    run leaves behind blocks nothing."""
    run(tmp_path, "--steps", "2")
    before = {n: (tmp_path / n).read_bytes() for n in ("ckpt.pt", "config.json", "log.jsonl")}
    (tmp_path / "young").mkdir()
    with open(tmp_path / "lock", "a+") as a, open(tmp_path / "young" / "lock", "a+") as b:
        for held in (a, b):                                            # two live runs' locks
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="in use by a live training run"):
            run(tmp_path, "--steps", "4", "--resume")
        with pytest.raises(SystemExit, match="in use by a live training run"):
            run(tmp_path / "young", "--steps", "4", "--seed", "5")
    assert all((tmp_path / n).read_bytes() == data for n, data in before.items())
    assert os.listdir(tmp_path / "young") == ["lock"]
    assert run(tmp_path, "--steps", "4", "--resume")["step"] == 4      # the lock file is left


def test_a_second_process_cannot_take_a_live_run_over(tmp_path):
    """The reproduction: a run is started, then the same command with another seed a moment later.
    The second exits 1 with one line; the first trains on alone and saves its own state."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *TINY, "--out-dir", str(tmp_path),
           "--steps", "100000", "--log-every", "50", "--ckpt-every", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
    try:
        wait_for(tmp_path / "log.jsonl")
        second = subprocess.run([*cmd, "--seed", "5"], capture_output=True, text=True, env=env)
        assert second.returncode == 1 and "in use by a live training run" in second.stderr
        assert second.stderr.count("\n") == 1 and first.poll() is None  # the first trains on
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 130
    finally:
        first.kill()
    ckpt = ats.load_checkpoint(str(tmp_path / "ckpt.pt"))
    steps = [r["step"] for r in log_records(tmp_path)]
    assert ckpt["config"]["seed"] == 0 and steps == list(range(50, 50 * len(steps) + 1, 50))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run, names the step ckpt.pt holds, and leaves ckpt.pt untouched."""
    run(tmp_path, "--steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    poison(monkeypatch, 2, "nan")
    with pytest.raises(SystemExit, match="loss became nan by step 4.*still holds step 2"):
        run(tmp_path, "--steps", "6", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_diverged_weights_never_reach_the_checkpoint(tmp_path, monkeypatch):
    """Weights with a huge but finite loss are not saved; with no checkpoint yet, it says so."""
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_saves_then_exits_130(tmp_path, monkeypatch, sig):
    """SIGINT, SIGTERM or SIGHUP in step 3 lets it finish, saves ckpt.pt at step 3, exits 130."""
    handlers = [signal.getsignal(s) for s in safety.Interrupt.SIGNALS]
    step = ats.Trainer.train_step

    def step_then_signal(self, x0):
        if self.step == 2:
            os.kill(os.getpid(), sig)
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "10", "--ckpt-every", "100")
    assert e.value.code == 130
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3
    assert [signal.getsignal(s) for s in safety.Interrupt.SIGNALS] == handlers  # restored


def test_a_failed_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint write that fails half-way (a full disk) stops the run with one line that says
    so; ckpt.pt keeps the last good step and no temporary file is left."""
    run(tmp_path, "--steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    full = []                                                         # the disk fills up now

    def disk_full(obj, path, *a, **k):
        full.append(path)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 64 vs 100")
    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(safety, "disk_free", lambda path: 1000 if full else 10**12)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "4", "--resume")
    monkeypatch.undo()
    message = e.value.code
    assert message.startswith("error:") and "\n" not in message and "the disk is full" in message
    assert "still holds step 2" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_too_little_space_is_refused_before_training(tmp_path, monkeypatch):
    """An out-dir whose disk cannot hold two checkpoints is refused before the first step."""
    monkeypatch.setattr(safety, "disk_free", lambda path: 1000)
    monkeypatch.setattr(ats.Trainer, "train_step", lambda *a: pytest.fail("a step ran"))
    with pytest.raises(SystemExit, match="MB free, and a checkpoint needs about"):
        run(tmp_path, "--steps", "2")


def test_the_lock_refusal_names_only_a_pid_that_holds_the_lock(tmp_path):
    """A refused run names the pid that /proc/locks says holds the folder's lock, not the stale
    one an earlier run wrote into the file; without /proc/locks it says whose pid that was."""
    (tmp_path / "lock").write_text("pid 999999 on elsewhere\n")
    with open(tmp_path / "lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)               # this process: live
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--steps", "2")
    holder = (f"pid {os.getpid()}" if os.path.exists("/proc/locks") else
              "pid written by the last run: 999999 on elsewhere")
    assert e.value.code == (f"error: {tmp_path} is in use by a live training run: another "
                            f"process holds its lock ({holder}); wait for it to end, or choose "
                            "another --out-dir")


def test_the_memory_line_gives_the_size_in_a_unit_that_fits():
    """The out-of-memory line says 36.9 kB, 2.5 GB or 12 bytes, never 'asked for 0.0 GB'."""
    for asked, said in ((36864, "36.9 kB"), (2_500_000_000, "2.5 GB"), (12, "12 bytes")):
        with pytest.raises(SystemExit) as e, safety.memory_for("--ch"):
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                               f"{asked} bytes. Error code 12 (Cannot allocate memory)")
        assert e.value.code == f"error: out of memory (it asked for {said}): lower --ch"


# -------------------------------------------------------------------------------------------------
# FID over training
# -------------------------------------------------------------------------------------------------


def test_fid_over_training_is_logged_plotted_and_kept_on_resume(tmp_path, stand_in_fid):
    """--fid-every logs FID and KID of the EMA weights at its steps and at the end, draws them in
    metrics.png, and a resume keeps the earlier values."""
    ref = real_images(tmp_path / "ref", 12)
    fid_flags = ["--fid-every", "2", "--fid-n", "6", "--fid-batch", "4", "--fid-ref", str(ref)]
    run(tmp_path / "run", "--steps", "3", *fid_flags)
    records = [r for r in log_records(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in records] == [2, 3]
    assert all(r["fid"] > 0 and r["fid_n"] == 6 and "kid_std" in r for r in records)
    run(tmp_path / "run", "--steps", "4", "--resume", *fid_flags)
    fids = [r for r in log_records(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in fids] == [2, 3, 4] and fids[:2] == records
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "metrics.png").is_file()


@pytest.mark.parametrize("missing", ["torch-fidelity", "weights"])
def test_fid_that_cannot_run_stops_at_start_with_one_line(tmp_path, monkeypatch, missing):
    """Without torch-fidelity, or offline without its Inception weights, --fid-every fails before
    anything is trained or written; the line names what is missing and where the weights go."""
    ref = real_images(tmp_path / "ref", 4)
    fid_unavailable(monkeypatch, tmp_path, missing)
    monkeypatch.setattr(ats.Trainer, "train_step", lambda *a: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "2", "--fid-every", "2", "--fid-ref", str(ref))
    message = e.value.code
    assert message.startswith("error: --fid-every:") and "\n" not in message
    if missing == "torch-fidelity":
        assert "pip install torch-fidelity" in message
    else:
        weights = os.path.join(str(tmp_path / "torch-home"), "hub", "checkpoints",
                               "weights-inception-2015-12-05-6726825d.pth")
        assert "Inception weights" in message and weights in message
    assert not (tmp_path / "run").exists()


def test_a_run_without_fid_never_imports_torch_fidelity(tmp_path):
    """Training without --fid-every imports neither fid.py nor torch-fidelity."""
    argv = [*TINY, "--out-dir", str(tmp_path), "--steps", "2"]
    code = (f"import sys, train; train.main({argv!r}); print(sorted(m for m in sys.modules "
            "if m == 'fid' or m.startswith('torch_fidelity')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# -------------------------------------------------------------------------------------------------
# Several processes: gloo on CPU, in-process ranks and torchrun
# -------------------------------------------------------------------------------------------------


def _ddp_rank(rank, world, port, out_dir, extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), TORCH_HOME=os.path.join(out_dir, "th"))
    torch.set_num_threads(1)
    use_stand_in_fid()
    built, build = [], train.build
    train.build = lambda cfg, device: built.append(build(cfg, device)) or built[-1]
    train.main([*TINY, "--out-dir", out_dir, *extra])
    trainer = built[0]
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                "policy": trainer.sampler.policy.state_dict(), "queue_x": trainer.sampler.queue_x,
                "S": trainer.sampler.S}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_run_stays_in_sync_resumes_and_splits_fid(tmp_path, stand_in_fid):
    """With 2 gloo processes, weights, policy, queue and S match across ranks; ckpt.pt resumes in
    1 and in 2 processes; the FID of samples split over the ranks equals sample.py's FID of the
    same images made by one process."""
    ref = real_images(tmp_path / "ref", 12)
    fid_flags = ["--fid-every", "8", "--fid-n", "7", "--fid-ref", str(ref)]
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "8", *fid_flags]),
             nprocs=2)                                                 # updates at 0, 2, 4, 6
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("model", "ema", "policy"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name} differs between ranks"
    assert len(r0["queue_x"]) == 3 and torch.equal(r0["queue_x"], r1["queue_x"])
    assert torch.equal(r0["S"], r1["S"])
    start = ats.AdaptiveTimestepSampler(50, vlb_fn=None, in_channels=3).policy.state_dict()
    assert not torch.equal(r0["policy"]["15.weight"], start["15.weight"])  # the policy did move
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8
    logged = [r for r in log_records(tmp_path) if "fid" in r]
    assert len(logged) == 1 and logged[0]["fid_n"] == 7
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--n", "7", "--steps", "3", "--out-dir",
                 str(tmp_path / "samples"), "--fid", str(ref)])
    scored = json.loads((tmp_path / "samples" / "fid.json").read_text())
    assert scored["fid"] == pytest.approx(logged[0]["fid"], rel=1e-6)
    assert run(tmp_path, "--steps", "10", "--resume")["step"] == 10
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "12", "--resume"]),
             nprocs=2)
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 12


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_torchrun_signal_saves_within_seconds(tmp_path, sig):
    """A signal to torchrun with 2 gloo workers and no save due for 100,000 steps leaves a
    checkpoint within seconds, reported once, by rank 0."""
    proc = torchrun(tmp_path)
    try:
        wait_for(tmp_path / "log.jsonl")                               # opened before step 1
        time.sleep(3.0)
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    step = ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert step > 0 and output.count("interrupted at step") == 1, output
    assert f"interrupted at step {step}" in output


def test_torchrun_workers_stop_when_the_launcher_is_killed(tmp_path):
    """kill -9 of the torchrun launcher: both workers notice within seconds, rank 0 saves, and no
    worker is left training as an orphan."""
    proc = torchrun(tmp_path)
    try:
        wait_for(tmp_path / "log.jsonl")
        time.sleep(2.0)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                                  capture_output=True, text=True).stdout.split()]
        assert len(workers) == 2
        proc.kill()                                                    # SIGKILL: no forwarding
        proc.wait()
        deadline = time.time() + 60
        while any(os.path.exists(f"/proc/{w}") and not zombie(w) for w in workers):
            assert time.time() < deadline, "a worker kept training after its launcher died"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):                  # nothing may outlive it
            os.killpg(proc.pid, signal.SIGKILL)
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] > 0


def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_torchrun_run_that_finishes_exits_0(tmp_path):
    """A normal 2-process run ends with exit code 0 and its checkpoint, grid and heatmap."""
    proc = torchrun(tmp_path, steps="20")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 20
    assert (tmp_path / "grid_0000020.png").is_file() and (tmp_path / "sampler.png").is_file()


def ranks(proc):
    """{rank: pid} of the workers of a torchrun launcher."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                           text=True).stdout.split()]
    environ = {p: open(f"/proc/{p}/environ", "rb").read().split(b"\0") for p in pids}
    return {int(v[5:]): p for p, env in environ.items() for v in env if v.startswith(b"RANK=")}


def signal_rank_1(tmp_path, sig, wait_file, *flags):
    """Start a two-worker torchrun run, send `sig` to rank 1 alone once `wait_file` exists; return
    the launcher's output and the step ckpt.pt holds."""
    proc = torchrun(tmp_path, *flags)
    try:
        wait_for(tmp_path / wait_file)
        time.sleep(1.0)
        os.kill(ranks(proc)[1], sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return output, ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]


def test_torchrun_signal_to_one_rank_is_named_as_such(tmp_path):
    """SIGTERM to rank 1 alone: both ranks save and stop, and rank 0's one line says that another
    rank received a signal, not '(None received)'."""
    output, step = signal_rank_1(tmp_path, signal.SIGTERM, "log.jsonl")
    assert f"interrupted at step {step} (another rank received a signal)" in output, output
    assert "None received" not in output


def test_torchrun_kill_9_of_one_rank_is_one_line(tmp_path):
    """kill -9 of rank 1: rank 0 does not die in a gloo 'Connection reset by peer' traceback; it
    says in one line that a process of the run was lost and which step ckpt.pt holds."""
    output, step = signal_rank_1(tmp_path, signal.SIGKILL, "ckpt.pt", "--ckpt-every", "5")
    line = (rf"error: at step \d+ another process of this run was lost \([^)]+\)\. "
            rf"{re.escape(str(tmp_path / 'ckpt.pt'))} still holds step {step}\. Resume with "
            r"--resume once every process can start again\.\n")
    assert re.search(line, output), output
    assert "[rank0]: Traceback" not in output and "[rank0]:" not in output
