"""One-line error messages: every CLI error is a single line that says what to do, so the text
of an underlying exception (a multi-line traceback-like message from transformers, safetensors,
YAML, torch.load) is cut to its first line before it is quoted."""

from __future__ import annotations


def one_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its first sentence when that line is
    long), at most ``limit`` characters; the exception's type name when the message is empty."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if len(text) > limit // 2 and ". " in text:
        text = text[:text.index(". ") + 1]
    return text if len(text) <= limit else text[:limit] + "..."
