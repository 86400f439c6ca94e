"""safety.py, through train.py: the out-dir lock, divergence, signals, failed writes, the memory
guard. CPU only."""

import fcntl
import os
import signal
import subprocess
import sys

import pytest
import torch

import ats
import safety
from conftest import (
    HERE,
    TINY,
    log_records,
    poison,
    run,
    wait_for,
)


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


