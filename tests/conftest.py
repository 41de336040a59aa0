"""Shared test configuration: Hypothesis profiles.

``ci`` (selected when the CI environment variable is set): no per-example deadline and a modest
number of examples, so the suite stays fast on a small runner. ``dev`` (the default otherwise):
more examples, still no deadline, because a few executor examples (block size 1 at N=70) take
most of a second in pure Python. ``HYPOTHESIS_PROFILE=<name>`` overrides the choice.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=30, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", deadline=None, max_examples=100,
    suppress_health_check=[HealthCheck.too_slow])

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI")
                                                                else "dev"))
