"""One error type for everything a user can cause, with an exit code per kind.

The CLI prints `DppaError` as one line and exits with its code; anything else is a bug
(exit 1, traceback only with --debug). Names and paths come from untrusted checkpoints, so every
message is passed through `printable`: one line, no control characters, bounded length.
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4

MAX_MESSAGE = 2000  # characters; a 1 MB tensor name must not become a 1 MB error line


def printable(text, limit: int | None = None) -> str:
    """`text` with control characters, NUL, lone surrogates and other non-printables escaped
    (as Python writes them: \\n, \\x00, \\udc80), so that it prints as one line on any terminal and
    encodes as UTF-8; clipped to `limit` characters. Backslashes are kept, so it is idempotent."""
    text = text if isinstance(text, str) else str(text)
    if not text.isprintable():
        out = []
        for c in text:
            if c.isprintable():
                out.append(c)
            else:
                o = ord(c)
                out.append({10: "\\n", 13: "\\r", 9: "\\t"}.get(o) or
                           (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"))
        text = "".join(out)
    if limit is not None and len(text) > limit:
        text = text[:max(0, limit - 3)] + "..."  # exactly `limit` long: clipping again changes nothing
    return text


class _Full(Exception):
    pass


def short(value, limit: int = 120) -> str:
    """A bounded, one-line repr of an untrusted value (YAML or JSON): never expands an alias bomb,
    never fails on a 5000-digit integer, never recurses deeper than `limit`."""
    out: list[str] = []
    size = [0]

    def emit(s: str) -> None:
        out.append(s)
        size[0] += len(s)
        if size[0] > limit:
            raise _Full

    def walk(v) -> None:
        if isinstance(v, (list, tuple)):
            emit("[")
            for i, x in enumerate(v):
                emit(", " if i else "")
                walk(x)
            emit("]")
        elif isinstance(v, dict):
            emit("{")
            for i, (k, x) in enumerate(v.items()):
                emit(", " if i else "")
                walk(k)
                emit(": ")
                walk(x)
            emit("}")
        elif isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 256:
            emit(f"<{'-' if v < 0 else ''}integer of about {int(v.bit_length() * 0.30103)} digits>")
        elif isinstance(v, str):
            emit(repr(v[:limit + 1]))
        else:
            emit(repr(v)[:limit + 1])

    try:
        walk(value)
        return printable("".join(out))
    except _Full:
        return printable("".join(out))[:limit] + "..."


class DppaError(Exception):
    """A problem the user can fix. The message names the file/tensor/key and what is wrong."""

    exit_code = EXIT_INPUT

    def __init__(self, message="", *args):
        super().__init__(printable(message, MAX_MESSAGE), *args)


class UsageError(DppaError):
    """Bad command line or config (YAML)."""

    exit_code = EXIT_USAGE


class InputError(DppaError):
    """A checkpoint that is missing, malformed or incompatible with the others."""

    exit_code = EXIT_INPUT


class OutputError(DppaError):
    """The output cannot be written (exists, unwritable, disk full, damaged run state)."""

    exit_code = EXIT_OUTPUT
