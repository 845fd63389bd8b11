"""One exception type for everything a user can get wrong, and safe printing.

Every message names the file (and the tensor, where there is one) and the
problem, in one line, so a bulk audit's log says what to fix without a
traceback. The command line maps `LineageError` to exit code 2.

Names in messages come from strangers (tensor names in a header, file
names in an upload): one holding a newline or an ANSI escape would forge a
second `lineage: error:` line or recolour the terminal. `printable` escapes
them; every line lineage prints goes through it.
"""

from __future__ import annotations


class LineageError(Exception):
    """A problem with the user's input: a model file, an index, a model set."""

    exit_code = 2


def where(path: object, tensor: str | None = None) -> str:
    """`file` or `file [tensor]`, the prefix of every message."""
    return f"{path} [{tensor}]" if tensor else f"{path}"


def printable(text: object) -> str:
    """`text` with control characters (newlines, escapes, C1 controls) written as
    Python escapes, so one message stays one line and colours nothing."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
