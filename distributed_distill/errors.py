"""The one exception type for mistakes a user can fix.

Anything raised as `DistillError` is printed by the CLI as a single line (`error: ...`) with a
non-zero exit, and is raised before expensive work starts. Everything else is a bug and keeps
its traceback.
"""


class DistillError(Exception):
    """A problem with the user's config, data, models or launch; the message says what and where."""


class ConfigError(DistillError, ValueError):
    """An invalid config key, type or combination; the message names the key."""


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after writing a checkpoint; the CLI exits with `exit_code`, which a job
    script can tell from an error (sysexits EX_TEMPFAIL: try again). Run the same command to continue."""

    exit_code = 75
    verb = "preempted"


class Interrupted(Preempted):
    """The same after Ctrl-C (SIGINT): the shell's status for an interrupted command."""

    exit_code = 130
    verb = "interrupted"


class RankError(DistillError):
    """A problem one rank meets on its own (its share of a stream, its collective, its state in a checkpoint): printed
    by that rank, naming it. Every other DistillError is met by all ranks alike and printed once, by rank 0."""


class ReportedElsewhere(DistillError):
    """Raised on the other ranks for an error the main process found and prints: the CLI exits with status 2
    without printing it again (one line per job, not one per rank)."""


def on_main(accelerator, fn):
    """Run `fn` on the main process only and give its result to every rank; a `DistillError` it raises is raised
    on every rank (as `ReportedElsewhere` on the others). For checks of shared files (the run directory, the model
    files): decided once, agreed by all ranks, before any rank does expensive work."""
    verdict = [None, None]
    error = None
    if accelerator.is_main_process:
        try:
            verdict[0] = fn()
        except DistillError as e:
            error, verdict[1] = e, str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(verdict)
    if error is not None:
        raise error
    if verdict[1] is not None:
        raise ReportedElsewhere(verdict[1])
    return verdict[0]


class WriteError(DistillError):
    """Writing a checkpoint, a store shard, metrics or the export failed (a full disk, a read-only or vanished
    file system); the message names what was being written and what is still complete."""


def write_failure(e: BaseException, directory) -> str | None:
    """What went wrong in a failed write, in a few words ("no space left on device"), or None if `e` is not a
    failed write (a bug, which keeps its traceback). torch.save reports a full disk as a RuntimeError about the
    zip writer's position and safetensors as its own error type, so those are recognised by their text and the
    free space left."""
    import errno
    import shutil

    if isinstance(e, OSError):
        if e.errno is not None:
            return os_strerror(e.errno)
        return str(e).strip().splitlines()[0].lower() if str(e).strip() else type(e).__name__
    text = str(e)
    if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
        return os_strerror(errno.ENOSPC)
    writers = ("PytorchStreamWriter", "unexpected pos", "file write failed", "Error while serializing")
    if any(s in text for s in writers):
        try:
            if shutil.disk_usage(directory).free < 1 << 20:
                return os_strerror(errno.ENOSPC)
        except OSError:
            pass
        return f"write failed ({' '.join(text.split())[:160]})"
    return None


def os_strerror(code: int) -> str:
    import os

    return os.strerror(code).lower()
