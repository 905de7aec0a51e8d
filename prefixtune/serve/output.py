"""One generated row, token by token: its text, stop sequences, finish reason and streamed deltas.

The scheduler feeds every generated token to the row's :class:`TextStream` (all at once after a
batch, or one per decoding step); the stream says when the row is finished (EOS, a stop
sequence, or ``max_new_tokens``) and which new text can be sent to a streaming client now.

Text follows ``prefixtune.generate``: the tokens decoded without special tokens, then stripped.
A stop sequence ends the text just before it (the tokens that made it are still counted). A
delta never holds text that could still change: the start of a possible stop sequence, half a
UTF-8 character, or whitespace the final strip may remove; so the deltas of a row add up to its
final text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("prefixtune.serve")


@dataclass
class Delta:
    """What a row added since the last delta: text, logprob entries ``(token, logprob, top)`` and,
    on its last delta, the finish reason."""

    text: str
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


class TextStream:
    def __init__(self, tokenizer, eos: int | None, max_new_tokens: int, stop: tuple[str, ...] = (),
                 logprobs: bool = False):
        """``eos``: the token that ends the row (None: it does not, as for ``ignore_eos``)."""
        self.tokenizer, self.eos, self.max_new_tokens = tokenizer, eos, max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.want_logprobs = logprobs
        self.tokens: list[int] = []
        self.logprobs: list = []  # (token text, logprob, [(token text, logprob), ...]) per listed token
        self.raw = ""  # decoded text, cut before a stop sequence once one is found
        self.text = ""  # what has been sent (a prefix of the final text)
        self.finish_reason: str | None = None
        self._logprobs_sent = 0

    def add(self, token: int, logprob: tuple[float, list] | None = None) -> Delta:
        """Take the next generated token (and its (logprob, top) from the model) and return the delta."""
        if self.finish_reason is not None:
            raise RuntimeError("row already finished")
        self.tokens.append(token)
        if token == self.eos:  # counted as generated, but no text and no logprob entry
            self.finish_reason = "stop"
            return self._delta()
        if self.want_logprobs and logprob is not None:
            lp, top = logprob
            self.logprobs.append((self._piece(token), lp, [(self._piece(t), v) for t, v in top]))
        self.raw = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (self.raw.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.raw = self.raw[: min(cuts)]
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self._delta()

    def add_all(self, tokens: list[int], logprobs: list | None = None) -> Delta:
        """Feed a whole generation (the batch path); tokens after the finish are dropped. One delta."""
        text, entries = [], []
        for i, t in enumerate(tokens):
            d = self.add(t, logprobs[i] if logprobs else None)
            text.append(d.text)
            entries += d.logprobs
            if self.finish_reason is not None:
                break
        if self.finish_reason is None:  # ran out of tokens without EOS (generate stopped at its max)
            self.finish_reason = "length"
            d = self._delta()
            text.append(d.text)
            entries += d.logprobs
        return Delta("".join(text), entries, self.finish_reason)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _delta(self) -> Delta:
        if self.finish_reason is not None:
            final = self.raw.strip()
            if not final.startswith(self.text):  # a tokenizer whose decoding of a prefix is not a prefix
                log.warning("streamed text %r is not a prefix of the final text %r", self.text, final)
                final = self.text + final[len(self.text):]
            visible = final
        else:
            visible = self.raw.rstrip("\ufffd")  # half of a multi-byte character
            hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(visible)), 0, -1)
                        if visible.endswith(s[:k])), default=0)
            visible = visible[: len(visible) - hold].strip()
        new = visible[len(self.text):] if len(visible) > len(self.text) else ""
        self.text += new
        entries = self.logprobs[self._logprobs_sent:]
        self._logprobs_sent = len(self.logprobs)
        return Delta(new, entries, self.finish_reason)
