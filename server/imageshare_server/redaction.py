"""The one place secrets are scrubbed from text that leaves the process.

Logs, gRPC status messages and credential errors all go through
:func:`redact`. It removes every registered secret (AccessKey secrets, STS
and OIDC tokens, Redis passwords) in each spelling it takes on its way into
URLs, JSON and the V1 string-to-sign, and the string-to-sign ECS echoes on
``SignatureDoesNotMatch`` (it names our AccessKeyId and, with V1 signatures,
embeds the STS token): everything after ECS's marker goes, to the end of the
text, since V3 puts a newline and a digest after it and V1 a query string.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = ["REDACTED", "has_string_to_sign", "redact", "redact_encoded", "register_secret"]

REDACTED = "[redacted]"

# Shorter values would shred ordinary text; real AccessKey secrets are 30
# characters and STS tokens hundreds.
_MIN_SECRET_LENGTH = 8
# STS tokens rotate; keep the recent ones (an old token can still be in a
# retry's error message) without letting the pattern grow for ever.
_MAX_SECRETS = 64

_STRING_TO_SIGN = re.compile(r"(string to sign is:).*", re.IGNORECASE | re.DOTALL)
_STRING_TO_SIGN_MARKER = re.compile(r"string to sign is:", re.IGNORECASE)


def _variants(value: str) -> set[str]:
    """Spellings a secret takes on its way into URLs, JSON and the V1 string-to-sign."""
    once = quote(value, safe="")
    return {
        value,
        once,
        quote(once, safe=""),  # the V1 string-to-sign percent-encodes the query again
        quote_plus(value),
        json.dumps(value)[1:-1],
    }


def _pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    spellings = {v for s in values for v in _variants(s)}
    if not spellings:
        return None
    alternatives = sorted(spellings, key=len, reverse=True)
    return re.compile("|".join(re.escape(v) for v in alternatives))


class _SecretSet:
    """Registered secrets and one compiled pattern matching any spelling of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, None] = {}  # insertion-ordered set
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        with self._lock:
            if value in self._values:
                return
            self._values[value] = None
            while len(self._values) > _MAX_SECRETS:
                del self._values[next(iter(self._values))]
            self.pattern = _pattern(self._values)


_SECRETS = _SecretSet()


def register_secret(value: str | None) -> None:
    """Never let ``value`` (or its URL/JSON-encoded forms) leave the process again.

    Values shorter than 8 characters are ignored: they cannot be credentials,
    and scrubbing them would mangle unrelated text.
    """
    if value and len(value) >= _MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def redact(text: str, *, also: Iterable[str] = ()) -> str:
    """Scrub registered secrets, the values in ``also`` and echoed strings-to-sign.

    Safe to apply twice. ``also`` is for secrets in hand that are not (yet)
    registered, e.g. the token just sent to STS.
    """
    pattern = _SECRETS.pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    extra = [value for value in also if value and len(value) >= _MIN_SECRET_LENGTH]
    if extra:
        extra_pattern = _pattern(extra)
        assert extra_pattern is not None
        text = extra_pattern.sub(REDACTED, text)
    return _STRING_TO_SIGN.sub(rf"\1 {REDACTED}", text)


def has_string_to_sign(text: str) -> bool:
    """Whether ``text`` holds the string-to-sign ECS echoes (which :func:`redact` cuts)."""
    return _STRING_TO_SIGN_MARKER.search(text) is not None


def redact_encoded(line: str) -> str:
    """Scrub registered secrets from already-encoded text (a JSON log line)."""
    pattern = _SECRETS.pattern
    return pattern.sub(REDACTED, line) if pattern is not None else line
