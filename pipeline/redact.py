"""Keys out of every message: one function, used wherever a server's words or an error reach a person or a file."""

from __future__ import annotations

import re


def redact(text: str, secret: str | None) -> str:
    """Remove the key (and any prefix of it a server echoes back) from a message before anyone sees it."""
    if secret:
        text = text.replace(secret, "[redacted]")
        if len(secret) > 8:
            text = re.sub(re.escape(secret[:6]) + r"[\w*.\-]*", "[redacted]", text)
    return text
