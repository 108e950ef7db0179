"""A shared-memory segment is opened only as itself and only when it is this user's: names
come from the wire (an engine's descriptor, a pusher's store), and /dev/shm is shared by
every user and container on the host. A symbolic link, another user's file or a FIFO under
a valid name is refused by name, and nothing is mapped or written through it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlsync.transports import TransportError
from rlsync.transports.control import SHM_DIR, Segment, new_segment_name
from rlsync.transports.shm import ShmReceiver, ShmSender
from rlsync.transports.store import MappedStore
from rlsync.wire.protocol import StoreRef

OTHER_UID = 12345


@pytest.fixture
def segment() -> Iterator[Segment]:
    seg = Segment(new_segment_name("data"), 4096, create=True)
    yield seg
    seg.close()


@pytest.fixture
def spare_name() -> Iterator[str]:
    name = new_segment_name("link")
    yield name
    Path(SHM_DIR, name).unlink(missing_ok=True)


def test_a_symbolic_link_is_refused_and_its_target_left_alone(segment, spare_name):
    Path(SHM_DIR, spare_name).symlink_to(Path(SHM_DIR, segment.name))
    with pytest.raises(TransportError, match=f"shm {spare_name}: is a symbolic link; refused"):
        Segment(spare_name)
    with pytest.raises(TransportError, match="symbolic link"):
        MappedStore(StoreRef(name=spare_name, nbytes=4096))  # the pusher's side
    assert not segment.tensor().any()


def test_a_control_segment_named_through_a_link_is_refused_by_the_engine(spare_name):
    sender = ShmSender(capacity_bytes=4096, num_engines=1)
    try:
        Path(SHM_DIR, spare_name).symlink_to(Path(SHM_DIR, sender.control.name))
        descriptor = sender.descriptor(0)
        descriptor.control_name = spare_name
        with pytest.raises(TransportError, match=f"shm {spare_name}: is a symbolic link"):
            ShmReceiver(descriptor)
    finally:
        sender.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_segment_of_another_user_is_refused(segment):
    os.chown(Path(SHM_DIR, segment.name), OTHER_UID, OTHER_UID)
    with pytest.raises(TransportError, match=f"owned by uid {OTHER_UID}, not this process's"):
        Segment(segment.name)
    with pytest.raises(TransportError, match=f"owned by uid {OTHER_UID}"):
        MappedStore(StoreRef(name=segment.name, nbytes=4096))


def test_something_else_than_a_regular_file_is_refused(spare_name):
    os.mkfifo(Path(SHM_DIR, spare_name), 0o600)
    with pytest.raises(TransportError, match=f"shm {spare_name}: not a regular file; refused"):
        Segment(spare_name)
