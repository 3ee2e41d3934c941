"""Backend tests compile C++: they need g++, and share one build cache for the whole session."""
from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        skip = pytest.mark.skip(reason="g++ is not installed")
        for item in items:
            if "tests/backend" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def session_build_cache(tmp_path_factory):
    """Compiled modules are cached per test session (xdist workers share it through the file lock)."""
    if "NNCOMPILE_CACHE_DIR" not in os.environ:
        root = tmp_path_factory.getbasetemp()
        shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
        os.environ["NNCOMPILE_CACHE_DIR"] = str(shared / "nncompile-cache")
    yield
