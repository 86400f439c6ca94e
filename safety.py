"""The run's safety: the out-dir claim and its lock, checkpoint saves with their guards, signals,
the log cut and the memory guard. train.py calls these between its phases; none of them trains.

    with claim_out_dir(cfg, ckpt, identity, trainer, rank), Interrupt(world > 1) as interrupt:
        ...                                    # the loop: check_weights, then save, per checkpoint
"""

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
from dataclasses import asdict

import torch

import ats

# -------------------------------------------------------------------------------------------------
# The out-dir: one run at a time, room for two checkpoints, the log cut back on resume
# -------------------------------------------------------------------------------------------------

def file_identity(path):
    """(size, mtime) of a file, or None if there is none: enough to see that it was replaced."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


@contextlib.contextmanager
def claim_out_dir(cfg, ckpt, identity, trainer, rank):
    """Rank 0 creates and locks the out-dir for the block. A second run, or a second --resume, on a
    folder that a live run holds is refused; the lock goes with its process, however that ends.
    Also checks the free space, cuts log.jsonl back to the checkpoint's step and writes config.json
    from the checkpoint."""
    if rank > 0:
        yield
        return
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out-dir {out} is a file: name a folder")
    need, free = 2 * checkpoint_bytes(trainer), disk_free(out)  # a checkpoint and its temporary
    if free < need:
        raise SystemExit(f"error: {out} has {free / 1e6:.0f} MB free, and a checkpoint needs about "
                         f"{need / 2e6:.0f} MB, twice while it is replaced: make room")
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, "lock"), "a+")
    except OSError as e:
        raise SystemExit(f"error: --out-dir {out} cannot be created or written ({e.strerror}): "
                         "choose another") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(lock)
        lock.close()
        raise SystemExit(f"error: {out} is in use by a live training run: another process holds "
                         f"its lock ({holder}); wait for it to end, or choose another --out-dir"
                         ) from None
    if ckpt is not None and file_identity(os.path.join(out, "ckpt.pt")) != identity:
        lock.close()
        raise SystemExit(f"error: {out}/ckpt.pt changed while this run started (another run wrote "
                         "it): run the same command again")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    cut_log(os.path.join(out, "log.jsonl"), ckpt["step"] if ckpt else 0)
    write_config(out, ckpt and ckpt["config"], ckpt and ckpt["step"])  # ckpt.pt's, after any kill
    try:
        yield
    finally:
        lock.close()                                       # the folder is free for another run


def lock_holder(lock):
    """Who holds the flock on the open file `lock`: the pid /proc/locks names, if that process is
    alive; else what the last run wrote into the file, which may be stale."""
    st = os.fstat(lock.fileno())
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/locks") as f:                   # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:56"
            for words in (line.split() for line in f):
                if "FLOCK" in words and "->" not in words and inode in words:
                    pid = int(words[words.index(inode) - 1])
                    if os.path.exists(f"/proc/{pid}"):
                        return f"pid {pid}"
    lock.seek(0)
    written = lock.read().strip()
    return f"pid written by the last run: {written.removeprefix('pid ')}" if written else "no pid"


def checkpoint_bytes(trainer):
    """About what a checkpoint takes: the model, its EMA and Adam's two moments, in fp32."""
    return 16 * sum(p.numel() for p in trainer.model.parameters())


def disk_free(path):
    """Free bytes on the disk that holds path, or would hold it once created."""
    while not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))
    return shutil.disk_usage(path).free


def cut_log(path, step):
    """Drop the log lines past `step` (and any line a crash cut short, or that is not UTF-8 JSON): a
    run that stopped after its last checkpoint logged them, and the resumed run logs those steps
    again."""
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:                                          # a folder named log.jsonl, say
        raise SystemExit(f"error: cannot read {path} ({e.strerror}): it is not this run's log; "
                         "move it away, then run again") from None
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:                  # UnicodeDecodeError: ValueError
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) < len(lines):
        with open(path + ".tmp", "wb") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


# -------------------------------------------------------------------------------------------------
# Memory: a failed allocation becomes one line naming the flags to lower
# -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def memory_for(flags):
    """An allocation that fails inside becomes one line naming the settings to lower."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:      # torch.OutOfMemoryError is a RuntimeError
        text = str(e)
        if not isinstance(e, MemoryError) and not re.search("alloc|out of memory", text):
            raise
        size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]iB)", text)
        need = "" if size is None else f" (it asked for {size[2] or in_units(int(size[1]))})"
        raise SystemExit(f"error: out of memory{need}: lower {flags}") from None


def in_units(n):
    """A byte count as people write it: 36864 -> '36.9 kB', 3e9 -> '3 GB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000


# -------------------------------------------------------------------------------------------------
# Checkpoints: written only from weights that pass the divergence guard, with config.json beside
# -------------------------------------------------------------------------------------------------

MAX_CKPT_LOSS = 2.0  # weights are saved only if their L_simple is finite and below this (zero: 1)


def kept(path, saved):
    """What the last good checkpoint is, as the end of an error line."""
    return "No checkpoint was written." if saved is None else f"{path} still holds step {saved}."


def save(cfg, trainer, name, extra, saved):
    """Write a checkpoint, and config.json with the config it holds. A failed write (a full disk,
    say) stops the run with one line; the last good checkpoint stays and no temporary is left."""
    path = os.path.join(cfg.out_dir, name)
    config = asdict(cfg)
    try:
        ats.save_checkpoint(path, trainer, config, extra)
        if name == "ckpt.pt":
            write_config(cfg.out_dir, config, trainer.step)
    except (OSError, RuntimeError) as e:
        free = disk_free(cfg.out_dir)
        full = free < checkpoint_bytes(trainer)
        why = "the disk is full" if full else str(e).splitlines()[0][:160]
        last = kept(os.path.join(cfg.out_dir, "ckpt.pt"), saved)
        raise SystemExit(f"error: writing {path} at step {trainer.step} failed ({why}; "
                         f"{free / 1e6:.0f} MB free). {last} Make room, then --resume.") from None


def write_config(out_dir, config, step):
    """config.json: ckpt.pt's config and step ("ckpt_step"), written atomically after ckpt.pt and
    again from ckpt.pt at every start, so a kill between the two writes is mended by the next
    start. With no checkpoint (config None) there is no config.json."""
    path = os.path.join(out_dir, "config.json")
    if config is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    with open(path + ".tmp", "w") as f:
        json.dump({**config, "ckpt_step": step}, f, indent=2)
    os.replace(path + ".tmp", path)


def max_over_ranks(x):
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x.item()


def check_weights(trainer, path, saved):
    """Stop before saving weights whose loss is not finite or is above MAX_CKPT_LOSS (twice what
    predicting zero noise scores). Every rank checks its own batch; the worst decides."""
    loss = torch.tensor(trainer.check_loss(trainer.batch), device=trainer.device)
    loss = loss.item() if ats.rank_and_size()[1] == 1 else max_over_ranks(loss)
    if not (math.isfinite(loss) and loss <= MAX_CKPT_LOSS):
        raise SystemExit(f"error: at step {trainer.step} the weights give L_simple {loss:.3g} "
                         f"(above {MAX_CKPT_LOSS}, worse than predicting zero noise): training "
                         f"diverged; not saved. {kept(path, saved)} Resume with a lower --lr, or "
                         "try --amp none.")


# -------------------------------------------------------------------------------------------------
# Signals, and the processes of a torchrun run agreeing on them or losing one another
# -------------------------------------------------------------------------------------------------


class Interrupt:
    """Turns SIGINT (Ctrl-C), SIGTERM (what schedulers and torchrun send) and SIGHUP (a closed
    terminal or ssh session) into a flag the loop checks between steps. Under torchrun, a worker
    whose launcher has died (its parent changed) raises the flag too."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, watch_parent):
        self.parent = os.getppid() if watch_parent else None
        self.reason = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, _frame):
        """Note the first signal; the loop saves and stops at the end of its step."""
        self.reason = self.reason or signal.Signals(signum).name
        if signum == signal.SIGHUP and sys.stdout.isatty():  # the terminal is gone: printing to
            sys.stdout = sys.stderr = open(os.devnull, "w")   # it would fail before the save

    @property
    def flag(self):
        """Whether to stop: a signal came, or the torchrun launcher is gone."""
        if self.parent is not None and os.getppid() != self.parent and not self.reason:
            self.reason = "lost launcher"
        return self.reason is not None

    def __exit__(self, *_):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def agree(flag, seconds, n, device, world):
    """(stop, steps until the next agreement): any rank's flag stops all; rank 0's clock paces
    the checks to about every 2 seconds."""
    if world == 1:
        return flag, 1
    rank = ats.rank_and_size()[0]
    pace = max(1, round(2.0 * n / max(seconds, 1e-6))) if rank == 0 else 0
    t = ats.all_reduce(torch.tensor([float(flag), float(pace)], device=device))
    return bool(t[0] > 0), int(t[1])


LOST_PEER = re.compile(r"Connection (reset|closed) by peer|Broken pipe|Socket Timeout")


@contextlib.contextmanager
def peer_lost(trainer, kept_line, world):
    """A collective that fails because another process of the run died (kill -9, a crashed node)
    becomes one line saying which step ckpt.pt holds, on every rank still alive."""
    try:
        yield
    except RuntimeError as e:                  # gloo's errors and dist.DistBackendError
        lost = LOST_PEER.search(str(e)) if world > 1 else None
        if lost is None:
            raise
        raise SystemExit(f"error: at step {trainer.step} another process of this run was lost "
                         f"({lost[0]}). {kept_line()} Resume with --resume once every process "
                         "can start again.") from None
