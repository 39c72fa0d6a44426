"""One job per directory: an exclusive lock on a run directory (or a store being written), held for the job's life.

    output_dir/.lock      {"host": ..., "pid": ..., "started": ..., "command": ...}   (while a job holds it)

The lock is `flock(LOCK_EX | LOCK_NB)` on that file, taken by the job's main process (global rank 0) before
anything is written into the directory; the other ranks of the same job learn the verdict through one broadcast
(`hold`). The kernel drops the lock when the process ends however it ends (SIGKILL, OOM, a lost node), so a
killed job never leaves a stale lock: its `.lock` file may remain, but nobody holds it and the next job takes it.
A second job on the same directory stops at once with one line naming the holder.

`distill train` takes the lock before torch is even imported (`acquire_early`, rank 0 of a launch), so a double
submit ends within a fraction of a second; `train()` called from Python takes it itself.

File systems: flock works on local disks and tmpfs; on NFS (Linux >= 2.6.12) the kernel maps it to a POSIX byte
range lock, which the server holds and releases when the client's process ends; Lustre needs the `flock` mount
option (without it flock fails with ENOSYS, reported as such).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import DistillError, on_main

NAME = ".lock"
# Locks this process holds, by resolved directory: re-entrant within a process (the CLI's early lock and the
# trainer's are the same lock).
_held: dict[str, DirLock] = {}


class LockError(DistillError):
    """The directory is in use by another job (or cannot be locked)."""


class DirLock:
    def __init__(self, root: Path, what: str, name: str = NAME):
        self.root, self.what = root, what
        self.path = root / name
        self.fd: int | None = None
        self.created: list[Path] = []  # directories this lock made (removed again if they stay empty)

    def acquire(self) -> None:
        """Take the lock or raise LockError naming the holder; creates the directory if needed (and removes it again
        on release if the job wrote nothing else)."""
        if self.root.exists() and not self.root.is_dir():
            raise LockError(f"{self.what}={self.root} is a file, not a directory; choose another {self.what}")
        try:
            if not self.root.is_dir():
                missing = [self.root, *(p for p in self.root.parents if not p.exists())]
                self.root.mkdir(parents=True, exist_ok=True)
                self.created = missing  # deepest first
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise LockError(self._busy()) from None
                except BaseException:
                    os.close(fd)
                    raise
                # The holder before us may have removed the file between our open and our lock (release unlinks it):
                # then we hold a lock on a file nobody else will ever open. Start again on the current file.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            self.fd = fd
            holder = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "command": " ".join(sys.argv)[:500],
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except LockError:
            self._undo_root()
            raise
        except OSError as e:
            self._undo_root()
            reason = "the file system does not support flock" if e.errno == errno.ENOSYS else e.strerror or str(e)
            raise LockError(
                f"{self.what}={self.root} cannot be written: {reason.lower()}; choose a writable directory"
            ) from None

    def _busy(self) -> str:
        # The holder writes its details right after taking the lock: a reader that comes in between waits briefly.
        holder = {}
        for _ in range(20):
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder:
                break
            time.sleep(0.05)
        who = (
            f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
            if holder
            else "a process that is just starting"
        )
        return (
            f"{self.what}={self.root} is in use by another job ({who}); wait for it to end or stop it, "
            f"or choose another {self.what}"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink first, then unlock: a job waiting on this inode re-checks the path after it gets the lock.
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._undo_root()

    def _undo_root(self) -> None:
        # Only empty ones: a job that failed before writing anything leaves no directory behind.
        for path in self.created:
            try:
                path.rmdir()
            except OSError:
                break
        self.created = []


def holder(root: str | Path, name: str = NAME) -> dict | None:
    """The job holding `root`'s lock ({"host", "pid", "started", "command"}), or None when no job holds it. A probe
    for readers (`distill report`): a shared lock taken and dropped at once, so a holder's exclusive lock is seen
    and nothing is created."""
    path = Path(root) / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: released (a release unlinks it) or never taken
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return json.loads(path.read_text() or "{}") or {"pid": None}
        except (OSError, ValueError):
            return {"pid": None}
    except OSError:
        return None
    finally:
        os.close(fd)  # (closing drops the shared lock, if it was taken)
    return None


def acquire(root: str | Path, what: str, name: str = NAME) -> DirLock:
    """This process's lock `name` in `root` (taken now, or already held)."""
    key = os.path.join(os.path.abspath(root), name)
    if key not in _held:
        lock = DirLock(Path(root), what, name)
        lock.acquire()
        _held[key] = lock
    return _held[key]


def release(root: str | Path, name: str = NAME) -> None:
    lock = _held.pop(os.path.join(os.path.abspath(root), name), None)
    if lock is not None:
        lock.release()


def launch_rank() -> int:
    """This process's global rank as the launcher set it (before any process group exists): torchrun and
    `accelerate launch` set RANK, srun SLURM_PROCID; without a launcher this is the only process."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def launcher_world_size() -> tuple[str, int]:
    """How many processes the launcher started, and the variable that says so (before any process group exists,
    and after it is destroyed)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        if os.environ.get(name):
            return name, int(os.environ[name])
    return "WORLD_SIZE", 1


def acquire_early(root: str | Path, what: str) -> None:
    """Before torch is imported: rank 0 of a launch takes the lock, so a second job on the same directory ends in
    well under a second. The other ranks learn the verdict in `hold` (if rank 0 failed here, it has exited and the
    launcher stops them)."""
    if launch_rank() == 0:
        acquire(root, what)


def hold(root: str | Path, what: str, accelerator, name: str = NAME) -> None:
    """Every rank: the main process holds the lock on `root` (taken now unless already held), the others learn
    whether it does. Raises LockError on every rank when another job holds it."""

    def take() -> None:
        acquire(root, what, name)

    on_main(accelerator, take)
