"""One exception type for everything a user can get wrong.

Every message names the file (and the tensor, where there is one) and the
problem, in one line, so a bulk audit's log says what to fix without a
traceback. The command line maps `LineageError` to exit code 2.
"""

from __future__ import annotations


class LineageError(Exception):
    """A problem with the user's input: a model file, an index, a model set."""

    exit_code = 2


def where(path: object, tensor: str | None = None) -> str:
    """`file` or `file [tensor]`, the prefix of every message."""
    return f"{path} [{tensor}]" if tensor else f"{path}"
