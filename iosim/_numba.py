"""``njit_cached``: Numba's ``njit(cache=True)``, or plain ``njit`` where no cache can be written.

Numba refuses to even define a ``cache=True`` function when it finds no writable cache folder
(``NUMBA_CACHE_DIR`` unwritable, the package's ``__pycache__`` read-only, no writable user cache
folder): a ``RuntimeError`` at import, which would stop every command, ``iosim --help`` included.
Here the first decorated function finds out whether caching works; if not, that function and
every later one compile without a cache (each process compiles its kernels anew, a few seconds)
and one :class:`~iosim.errors.NumbaCacheWarning` says so, once per process tree (worker
processes started afterwards inherit ``IOSIM_NUMBA_CACHE_WARNED`` and stay quiet).
"""
from __future__ import annotations

import os
import warnings

from numba import njit

from .errors import NumbaCacheWarning

#: Set in the environment once the warning is given, so that worker processes do not repeat it.
WARNED_ENV = "IOSIM_NUMBA_CACHE_WARNED"

#: None until the first decorated function tries; then whether Numba could cache it.
_cache_works: bool | None = None


def _warn_once(func) -> None:
    if os.environ.get(WARNED_ENV):
        return
    os.environ[WARNED_ENV] = "1"
    folder = os.path.dirname(func.__code__.co_filename)
    where = (f"NUMBA_CACHE_DIR={os.environ['NUMBA_CACHE_DIR']!r}, "
             if os.environ.get("NUMBA_CACHE_DIR") else "")
    message = (f"Numba can write no cache ({where}{folder}/__pycache__ and the user cache "
               "folder are not writable folders): iosim compiles its kernels without a cache, "
               "anew in each process (a few seconds); set NUMBA_CACHE_DIR to a writable folder "
               "to cache them")
    # lineno 0: the warning prints as one line (no source line is shown under it)
    warnings.warn_explicit(message, NumbaCacheWarning, func.__code__.co_filename, 0,
                           module=__name__)


def njit_cached(*args, **options):
    """``@njit_cached`` or ``@njit_cached(inline="always", ...)``: ``njit(cache=True, ...)``,
    falling back to ``njit(...)`` (uncached) when Numba has nowhere to write its cache.

    The functions release the GIL (``nogil=True``: they are plain loops over arrays), so that
    while one runs in the command thread the main thread can still answer Ctrl-C at once."""
    options.pop("cache", None)
    options.setdefault("nogil", True)

    def decorate(func):
        global _cache_works
        if _cache_works is not False:
            try:
                dispatcher = njit(cache=True, **options)(func)
            except RuntimeError:  # "cannot cache function ...: no locator available"
                _cache_works = False
                _warn_once(func)
            else:
                _cache_works = True
                return dispatcher
        return njit(**options)(func)

    if len(args) == 1 and callable(args[0]) and list(options) == ["nogil"]:
        return decorate(args[0])
    if args:
        raise TypeError("njit_cached takes keyword options only, e.g. inline='always'")
    return decorate


def cache_works() -> bool | None:
    """Whether Numba could cache iosim's kernels in this process (None before any was defined)."""
    return _cache_works
