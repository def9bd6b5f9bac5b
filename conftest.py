"""Keeps tests and doctests from writing the dataset cache into the home directory."""
import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache():
    previous = os.environ.get("LOTTOJAX_CACHE")
    with tempfile.TemporaryDirectory(prefix="lottojax-cache-") as path:
        os.environ["LOTTOJAX_CACHE"] = previous or path
        yield
    if previous is None:
        os.environ.pop("LOTTOJAX_CACHE", None)
