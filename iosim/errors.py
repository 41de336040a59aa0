"""The package's error type: a ValueError whose message names the problem and what is allowed."""


class IosimError(ValueError):
    """Bad input to iosim: the message says what was wrong and what is allowed."""


class SpecError(IosimError):
    """A hardware spec (preset or TOML file) that is missing, malformed or fails validation."""


class TilingError(IosimError):
    """A tiling that is invalid or whose live tiles do not fit the on-chip memory."""
