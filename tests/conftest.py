"""Shared pytest fixtures.

`ray_cluster`: ONE private Ray for the whole pytest session, started only when a test asks
for it (session scope, lazy), shut down at the end. Its files (session dir, auth token) live
in a pytest temp dir reached through a short symlink (unix sockets must fit in 107 bytes);
nothing goes to ~/.ray or /tmp/ray. The launcher finds Ray already initialised and reuses
it, so every e2e run shares this one instead of starting its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

RAY_CPUS = 4
"""Logical CPUs: enough bundles for 2 trainers + 2 engines; Ray does not pin cores."""


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from rlsync.ray_session import disconnect, start_local

    session = start_local(tmp_path_factory.mktemp("ray"), num_cpus=RAY_CPUS, log_to_driver=False)
    try:
        yield session
    finally:
        disconnect(session)
