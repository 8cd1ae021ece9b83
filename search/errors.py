"""Errors that end a command with one line and a non-zero exit, never a traceback."""


class UserError(Exception):
    """Bad input from the user (file, key, value, URL): exit 2."""

    exit_code = 2


class Interrupted(Exception):
    """A stop was asked for (SIGINT / SIGTERM); the trial is re-queued to resume."""
