"""Stop strings checked on the decoded text: streamed text is held back while it could still become a stop string,
and generation ends at the first one (which is not emitted)."""

from __future__ import annotations

from typing import Sequence


class StopText:
    """Feed the whole decoded text so far; get back the new piece that is safe to show."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self.hit: str | None = None  # the stop string that ended the text
        self._sent = 0  # characters handed out so far
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """The piece of `text` (the full decoded text so far) that can be shown now. After a hit, hit is set and
        the piece ends just before the stop string."""
        if not self.stops:
            return self._take(text, len(text))
        start = max(0, self._sent - self._longest + 1)  # a stop string can end only in text not yet searched
        found = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
        if found:
            end, self.hit = min(found)
            return self._take(text, end)
        return self._take(text, len(text) - self._held_back(text))

    def flush(self, text: str) -> str:
        """The rest of `text` once generation ended without a hit."""
        return "" if self.hit is not None else self._take(text, len(text))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of text that begins some stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _take(self, text: str, end: int) -> str:
        piece = text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return piece
