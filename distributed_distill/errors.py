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
