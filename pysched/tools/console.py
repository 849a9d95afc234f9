"""A status line for the command-line tools: redrawn in place on a terminal, plain lines elsewhere.

Shared by ``pysched simulate`` and the ``pysched nodes`` / ``pysched load``
demos, so every tool reports progress the same way.
"""

from __future__ import annotations

from typing import IO

__all__ = ["StatusLine"]


class StatusLine:
    r"""Writes status lines to ``stream``.

    On a terminal each line replaces the previous one (``\r``, padded to
    cover it); elsewhere (logs, CI) each is its own line.

    :param stream: where to write, usually ``sys.stderr``.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._width = 0

    def line(self, text: str) -> None:
        """Show ``text`` as the current status.

        :param text: one line, without a newline.
        """
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End a redrawn line, so what follows starts on a fresh one."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
