"""Fixtures of the real-world corpus tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def realworld_cache(request, tmp_path_factory):
    """Where recorded feeds are kept: pytest's cache dir (``.pytest_cache/d/realworld``, reused
    across runs; file names carry the package version and a digest of corpus.py), else a
    temporary dir when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return cache.mkdir("realworld")
    return tmp_path_factory.mktemp("realworld")
