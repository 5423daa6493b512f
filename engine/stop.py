"""Stop strings: find where a streamed text must end (torch-free).

Generation stops when the completion text contains one of the request's stop
strings; the text ends just before the earliest match, which may be split across
any number of tokens. A stream must never emit text that later turns out to
belong to a stop string, so :class:`StopStringMatcher` holds back the longest
suffix of the text that could still start one.

Invariant after every :meth:`StopStringMatcher.push`: the text emitted so far
contains no stop string, and no stop string can begin inside it (any match that
the next pieces complete starts in the held-back suffix). Hence every match lies
inside ``held + new piece`` and only that short window is searched.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Cuts one request's streamed text at its first stop string.

    Args:
        stop: the stop strings (non-empty; may be empty as a whole: every piece
            then passes through unchanged).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        assert all(stop), "stop strings must be non-empty"
        self.stop = tuple(stop)
        self.stopped = False
        self._held = ""

    def push(self, piece: str) -> str:
        """Add the next piece of text; return the text that is now safe to emit.

        Once a stop string is found, :attr:`stopped` is set, the returned text
        ends just before the match, and later calls return ``""``.
        """
        if self.stopped:
            return ""
        if not self.stop:
            return piece
        window = self._held + piece
        hits = [i for i in (window.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return window[: min(hits)]
        keep = self._partial_match_start(window)
        self._held = window[keep:]
        return window[:keep]

    def flush(self) -> str:
        """End of the stream without a match: return the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match_start(self, window: str) -> int:
        """Smallest index ``j`` such that ``window[j:]`` is a proper prefix of a stop
        string (``len(window)`` when none is)."""
        longest = max(len(s) for s in self.stop)
        for j in range(max(0, len(window) - longest + 1), len(window)):
            tail = window[j:]
            if any(s.startswith(tail) for s in self.stop):
                return j
        return len(window)
