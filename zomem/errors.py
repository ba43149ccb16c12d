"""Errors that zomem reports to the user as a message, never as a traceback."""


class UsageError(ValueError):
    """Bad input (a name, a shape, a dtype): reported before anything is allocated, exit status 2."""


class UnknownNameError(UsageError, KeyError):
    """A name that no registry knows; the message lists the valid names and the closest matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CellFailed(RuntimeError):
    """A cell whose child failed for a reason other than memory, where the command cannot go on without its answer:
    reported as a message, exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (how Slurm cancels a job and CI enforces a timeout), raised where Ctrl-C would raise
    KeyboardInterrupt so that it is handled alike: the child in flight is killed, records written are kept."""
