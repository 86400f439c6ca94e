"""train.py: config and flags, outputs and a bit-identical resume, what protects a run (the lock,
signals, a diverged loss), one line for the mistakes people make, FID over training, torchrun.
CPU only."""

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

import ats
import train
from conftest import HERE, TINY, free_port, log_records, poison, real_images, run


def assert_same_weights(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def test_explicit_flags_beat_the_preset():
    """A preset's values apply under the flags given, the defaults are the released setup."""
    cfg = train.resolve(train.parse_args(["--preset", "tiny", "--lr", "0.5"]))
    assert (cfg.lr, cfg.steps, cfg.dataset) == (0.5, 2000, "synthetic")
    assert train.resolve({}).schedule == "quad" and train.resolve({}).update_every == 40


def test_a_run_writes_its_outputs_and_a_resumed_run_is_bit_identical(tmp_path):
    """4 steps, then --resume to 8, give the weights, sampler state and log of one 8-step run;
    the log has each step once; grids and the policy heatmap are written."""
    whole = run(tmp_path / "whole", "--steps", "8")
    run(tmp_path / "split", "--steps", "4")
    split = run(tmp_path / "split", "--steps", "8", "--resume")
    assert_same_weights(whole, split)
    assert torch.equal(whole["sampler"]["queue_x"], split["sampler"]["queue_x"])
    assert [r["step"] for r in log_records(tmp_path / "split")] == [2, 4, 6, 8]
    assert [r["loss"] for r in log_records(tmp_path / "split")] == \
        [r["loss"] for r in log_records(tmp_path / "whole")]
    names = set(os.listdir(tmp_path / "split"))
    assert {"ckpt.pt", "log.jsonl", "grid_0000004.png", "grid_0000008.png", "sampler.png"} <= names
    model, diffusion = ats.load_model(split, "cpu")
    assert diffusion.T == 50 and model.config["ch"] == 16


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    """A changed model-defining flag, a --steps already reached, a missing or corrupt checkpoint,
    and a new run into a folder holding one each stop with one line; --lr may change."""
    run(tmp_path / "r", "--steps", "2")
    cases = [(["--resume", "--steps", "4", "--ch", "32"], "--ch 32 differs from the stored"),
             (["--resume", "--steps", "2"], "pass a --steps above it"),
             (["--steps", "4"], "exists: pass --resume")]
    for flags, match in cases:
        with pytest.raises(SystemExit, match=match):
            run(tmp_path / "r", *flags)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    for folder, match in (("none", "no checkpoint at"), ("bad", "truncated or corrupt")):
        with pytest.raises(SystemExit, match=match):
            run(tmp_path / folder, "--steps", "4", "--resume")
    assert run(tmp_path / "r", "--steps", "4", "--resume", "--lr", "0.01")["step"] == 4


@pytest.mark.parametrize("flags, match", [
    (["--T", "1"], "T must be in"), (["--ch", "15"], "ch must be an even number"),
    (["--num-selected", "60"], "num_selected"), (["--lr", "nan"], "lr must be in"),
    (["--sample-steps", "500"], "DDIM steps must be in"), (["--batch-size", "0"], "multiple"),
    (["--weighting", "min-snr", "--prediction", "v"], "written for eps-prediction"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/x"], "/nonexistent/x"),
    (["--ch-mult", "1,x"], "--ch-mult takes comma-separated integers"),
    (["--dataset", "cifar10", "--channels", "1"], "--channels must be 3 for cifar10"),
])
def test_impossible_settings_give_one_error_line_and_write_nothing(tmp_path, flags, match):
    """Each impossible setting stops with one 'error:' line, before the out-dir exists."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "2", *flags)
    assert e.value.code.startswith("error:") and match in e.value.code, e.value.code
    assert not (tmp_path / "run").exists()


def test_no_cifar10_says_where_to_put_it(tmp_path, monkeypatch):
    """Without CIFAR-10 and without a network, one line names the file and the folder."""
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="put cifar-10-python.tar.gz"):
        train.main([*TINY, "--dataset", "cifar10", "--channels", "3", "--data-dir",
                    str(tmp_path), "--out-dir", str(tmp_path / "run")])


def test_a_folder_of_images_trains(tmp_path):
    """--dataset folder reads the images under the folder's subfolders, grey or RGB."""
    real_images(tmp_path / "data" / "any", 16, channels=3)
    ckpt = run(tmp_path / "run", "--dataset", "folder", "--data-dir", str(tmp_path / "data"),
               "--steps", "2")
    assert ckpt["step"] == 2


def test_a_diverged_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN at step 5 stops the run with one line before any save, so ckpt.pt
    still holds step 4 and resumes."""
    poison(monkeypatch, at_step=4, how="nan")
    with pytest.raises(SystemExit, match="the loss became nan by step 6"):
        run(tmp_path / "r", "--steps", "8")
    assert ats.load_checkpoint(tmp_path / "r" / "ckpt.pt")["step"] == 4


def test_one_run_per_out_dir(tmp_path):
    """A second run into an out-dir that a live run holds is refused with one line."""
    (tmp_path / "r").mkdir()
    with open(tmp_path / "r" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="in use by another training run"):
            run(tmp_path / "r", "--steps", "2")


def test_sigterm_saves_and_exits_130(tmp_path, monkeypatch):
    """SIGTERM during step 3 finishes the step, saves ckpt.pt at step 3 and exits 130; the
    signal handlers are restored afterwards."""
    step = ats.Trainer.train_step

    def signalled(self, x0):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", signalled)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "r", "--steps", "8")
    assert e.value.code == 130
    assert ats.load_checkpoint(tmp_path / "r" / "ckpt.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before


def test_out_of_memory_gives_one_line(tmp_path, monkeypatch):
    """CUDA running out of memory stops with one line naming what to lower."""
    def oom(self, x0):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ats.Trainer, "train_step", oom)
    with pytest.raises(SystemExit, match="out of memory: lower --batch-size"):
        run(tmp_path / "r", "--steps", "2")


def test_fid_over_training_is_logged(tmp_path, stand_in_fid):
    """--fid-every scores EMA samples against a folder and logs FID and KID in log.jsonl."""
    ref = real_images(tmp_path / "real", 16)
    run(tmp_path / "r", "--steps", "4", "--fid-every", "4", "--fid-n", "8", "--fid-ref", str(ref))
    records = [r for r in log_records(tmp_path / "r") if "fid" in r]
    assert len(records) == 1 and records[0]["step"] == 4 and records[0]["fid_n"] == 8
    with pytest.raises(SystemExit, match="needs --fid-ref"):
        run(tmp_path / "s", "--steps", "4", "--fid-every", "4")


def test_torchrun_trains_resumes_and_exits_0(tmp_path):
    """Two gloo processes under torchrun train 4 steps, resume to 6 and exit 0 both times; the
    log counts the global batch, and the run equals itself resumed."""
    def torchrun(*flags):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", os.path.join(HERE, "train.py"), *TINY,
               "--out-dir", str(tmp_path / "r"), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    first = torchrun("--steps", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    second = torchrun("--steps", "6", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 process(es)" in first.stdout
    assert [json.loads(line)["step"] for line in open(tmp_path / "r" / "log.jsonl")] == [2, 4, 6]
    assert ats.load_checkpoint(tmp_path / "r" / "ckpt.pt")["step"] == 6
