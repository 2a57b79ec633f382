"""User errors: a mistake the user can fix, reported as one line without a traceback."""


class UserError(Exception):
    """Raised for bad input. The message names the problem and the fix."""

    exit_code = 2


class JobFailed(Exception):
    """A run that failed for a reason outside the user's input (a lost process, a full disk
    discovered mid-run), reported as one line that says what to do next."""

    exit_code = 1


class PeerLost(JobFailed):
    """This rank lost contact with another rank of a distributed job. Its own exit code, so a
    launcher can tell the rank that failed from the ranks that merely noticed."""

    exit_code = 75  # EX_TEMPFAIL: running again (with training.resume=auto) can succeed


class Interrupted(JobFailed):
    """Training was asked to end (SIGTERM: a scheduler, a preemption, a time limit) and stopped
    after writing a complete checkpoint. The shell's code for a SIGTERM death, so schedulers
    read it as one."""

    exit_code = 143
