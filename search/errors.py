"""Errors that end a command with one line and a non-zero exit, never a traceback; the exit
statuses a command and its workers use."""

EXIT_OK = 0
EXIT_FAILED = 1  # the command could not finish (workers gave up, the storage went silent)
EXIT_USAGE = 2  # bad input: a file, key, value or URL
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_STORAGE_GONE = 75  # a worker's: its storage stayed silent past its patience (EX_TEMPFAIL)


class UserError(Exception):
    """Bad input from the user (file, key, value, URL): exit 2."""

    exit_code = EXIT_USAGE


class Interrupted(Exception):
    """A stop was asked for (SIGINT / SIGTERM); the trial is re-queued to resume."""


class AttemptLost(Exception):
    """This worker's trial attempt was failed and retried elsewhere while it was unresponsive
    (paused, partitioned): it must drop the trial without touching its run or checkpoints."""


class StorageUnavailable(UserError):
    """The study's storage did not answer for longer than `--storage-patience`: the command
    stops like on SIGTERM, its trials left to resume from their checkpoints."""

    exit_code = EXIT_FAILED
