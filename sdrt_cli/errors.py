"""User-facing errors: one clear sentence, non-zero exit, never a traceback."""


class SdrtError(Exception):
    """Bad input or an unmet precondition, reported to the user as one sentence."""

    exit_code = 1


class UnknownNameError(SdrtError, KeyError):
    """A name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class RegistryCollisionError(SdrtError):
    """Two plugins registered the same name."""
