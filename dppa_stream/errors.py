"""One error type for everything a user can cause, with an exit code per kind.

The CLI prints `DppaError` as one line and exits with its code; anything else is a bug
(exit 1, traceback only with --debug).
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4


class DppaError(Exception):
    """A problem the user can fix. The message names the file/tensor/key and what is wrong."""

    exit_code = EXIT_INPUT


class UsageError(DppaError):
    """Bad command line or config (YAML)."""

    exit_code = EXIT_USAGE


class InputError(DppaError):
    """A checkpoint that is missing, malformed or incompatible with the others."""

    exit_code = EXIT_INPUT


class OutputError(DppaError):
    """The output cannot be written (exists, unwritable, disk full)."""

    exit_code = EXIT_OUTPUT
