"""The package's error type: a ValueError whose message names the problem and what is allowed."""


class IosimError(ValueError):
    """Bad input to iosim: the message says what was wrong and what is allowed."""


class SpecError(IosimError):
    """A hardware spec (preset or TOML file) that is missing, malformed or fails validation."""


class TilingError(IosimError):
    """A tiling that is invalid or whose live tiles do not fit the on-chip memory."""


class NumbaCacheWarning(RuntimeWarning):
    """Numba has nowhere to write its cache: iosim's kernels compile anew in each process."""


class TensorOverflowWarning(RuntimeWarning):
    """A tensor the executor wrote overflowed its dtype (float16: past 65504): the output is
    NaN/inf, as the same pipeline's would be on a GPU. One warning per run names the tensor."""
