"""Shared pytest fixtures.

`ray_cluster`: ONE private Ray for the whole pytest session, started only when a test asks
for it (session scope, lazy), shut down at the end. Its files (session dir, auth token) live
in a pytest temp dir reached through a short symlink (unix sockets must fit in 107 bytes);
nothing goes to ~/.ray or /tmp/ray. The launcher finds Ray already initialised and reuses
it, so every e2e run shares this one instead of starting its own.

`slow`-marked tests (learning runs, soaks) run only when asked for: `pytest -m slow`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

RAY_CPUS = 8
"""Logical CPUs (Ray does not pin cores): room for a kept colocated run (2) next to a
disaggregated one (4)."""


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from rlsync.app.ray_session import disconnect, start_local

    session = start_local(tmp_path_factory.mktemp("ray"), num_cpus=RAY_CPUS, log_to_driver=False)
    try:
        yield session
    finally:
        disconnect(session)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests are opt-in: they run only when the -m expression names `slow`."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: opt in with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
