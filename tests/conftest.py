"""Shared test set-up.

Tiny models run fastest on one thread (thread start-up dominates their matmuls, and two threads
fight over two cores). A test module that sets ``ALL_THREADS = True`` (the embedded model's slow
suite) keeps torch's default instead.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    if getattr(request.module, "ALL_THREADS", False):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh genrefine cache ($GENREFINE_CACHE) for the test module that asks for it."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("genrefine-cache")
        mp.setenv("GENREFINE_CACHE", str(d))
        yield d
