"""Incremental detokenization: the text of a request's growing output, decoding only its newest tokens.

Decoding a request's whole output after every token costs O(n) per token, O(n²) per request, and it runs on
the engine's critical path for every running request. :class:`Detokenizer` decodes a short window instead (the
prefix/read-offset method of Hugging Face's text-generation-inference and vLLM): the tokens since the last text
it gave out plus a few before them as context, and it gives out text only once the window's decoding is longer
than the context's and does not end in a partial UTF-8 character (U+FFFD). Once finished it flushes whatever is
left, so its text is that of one full decode (tests/test_detokenizer.py checks it on random token streams).

It also owns the two rules that decide which text may be shown: stop strings (the text is cut before the
first, and the request stops) and the hold-back of text that could still become a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decode gives for the bytes of a character that is not complete yet


class Detokenizer:
    """The text of one request's output tokens, kept up to date a few tokens at a time.

    Args:
        tokenizer: a Hugging Face tokenizer.
        stop: strings that end the request; :attr:`text` is cut before the first one found.
        skip_special_tokens: as in ``tokenizer.decode``.
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.stopped = False  # a stop string was found: the text ends before it
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self._prefix = 0  # ids[_prefix:_read] decode to the context already in the text
        self._read = 0
        # A fast tokenizer that cleans up no spaces decodes in its Rust core alone: the same text as
        # tokenizer.decode without the Python layers around it (a third of the time, per token and request).
        rust = getattr(tokenizer, "_tokenizer", None)
        fast = rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode_ids = rust.decode if fast else tokenizer.decode

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, ids: list[int], final: bool = False) -> str:
        """Take the output tokens so far (``ids``: the whole list, grown since the last call) and return the text
        they added. ``final``: the request ends with these tokens, so nothing is held back as a partial character.
        After a stop string was found the text no longer grows."""
        if self.stopped or self._read >= len(ids):
            return ""
        context = self._decode(ids[self._prefix:self._read])
        window = self._decode(ids[self._prefix:])
        if not final and (len(window) <= len(context) or window.endswith(REPLACEMENT)):
            return ""  # a partial character, or a token whose text depends on what follows
        new = window[len(context):]
        self._prefix, self._read = self._read, len(ids)
        return self._append(new)

    def _append(self, new: str) -> str:
        start = len(self.text)
        self.text += new
        if self.stop:
            # A stop string may begin in text added earlier: search from where one could still start.
            lo = max(0, start - self.holdback)
            cuts = [cut for cut in (self.text.find(s, lo) for s in self.stop) if cut >= 0]
            if cuts:
                self.text, self.stopped = self.text[:min(cuts)], True
        return self.text[start:]

    def stable_length(self, finished: bool) -> int:
        """How much of :attr:`text` can no longer change: all of it once the request finished or stopped, else
        all but the last ``len(longest stop string) - 1`` characters (they could still begin a stop string)."""
        if finished or self.stopped:
            return len(self.text)
        return max(0, len(self.text) - self.holdback)
