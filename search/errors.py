"""Errors that end a command with one line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (file, key, value, URL): exit 2."""

    exit_code = 2


class Interrupted(Exception):
    """A stop was asked for (SIGINT / SIGTERM); the trial is re-queued to resume."""


class AttemptLost(Exception):
    """This worker's trial attempt was failed and retried elsewhere while it was unresponsive
    (paused, partitioned): it must drop the trial without touching its run or checkpoints."""


class StorageUnavailable(UserError):
    """The study's storage did not answer for longer than `--storage-patience`: the command
    stops like on SIGTERM, its trials left to resume from their checkpoints."""

    exit_code = 1
