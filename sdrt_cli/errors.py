"""User-facing errors: one clear sentence, non-zero exit, never a traceback."""

import difflib
from typing import Iterable


class SdrtError(Exception):
    """Bad input or an unmet precondition, reported to the user as one sentence."""

    exit_code = 1


class UnknownNameError(SdrtError, KeyError):
    """A name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class RegistryCollisionError(SdrtError):
    """Two plugins registered the same name."""


def did_you_mean(name: str, choices: Iterable[str], *, cutoff: float = 0.6, sentence: bool = False) -> str:
    """The hint for a mistyped ``name``: ``"; did you mean 'x'?"`` naming the closest of ``choices``
    (`` Did you mean 'x'?`` with ``sentence``, to follow a full stop), or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    if not close:
        return ""
    return f" Did you mean {close[0]!r}?" if sentence else f"; did you mean {close[0]!r}?"
