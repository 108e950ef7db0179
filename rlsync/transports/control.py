"""Shared-memory plumbing of the IPC transports: named POSIX shm segments, the control
segment of progress counters, and the geometry of the data buffer.

Segments are our own `/dev/shm/rlsync-<pid>-<token>-<role>` files mapped with mmap (no
resource tracker). The creator holds an exclusive flock on the file for the segment's life
and unlinks it on close; `remove_orphan_segments` cleans up after a creator that was killed,
which the kernel shows by releasing its lock. Names read from the wire are validated before
anything is opened, and a segment is opened only as the file itself (never through a
symbolic link) and, when another process created it, only if it belongs to this user. Nothing here knows tensors' meaning or who
reads them; `shm` and `cuda_ipc` build the sender/engine protocol on top.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import threading
import time

import torch

from rlsync.plan.buckets import align_up
from rlsync.transports import TransportError
from rlsync.transports.integrity import TRAILER_BYTES
from rlsync.wire.protocol import BucketPlan, IpcBuffer

SHM_DIR = "/dev/shm"
PREFIX = "rlsync"
REGION_ALIGN = 256
COUNT_BITS = 20
MAX_PUSH_ID = (1 << 42) - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_OWN_NAME = re.compile(rf"{PREFIX}-[0-9]+-[0-9a-f]+-[a-z]+")
_MAGIC = 0x726C7379_6E6302  # 02: engines take part by name (member words)
_HDR_WORDS, _ENGINE_WORDS = 16, 8  # one 64-byte line per engine: no false sharing
_MAGIC_W, _ENGINES_W, _PID_W, _READY_W, _ABORTED_W = 0, 1, 4, 8, 9
_FENCE = threading.Lock()


def seq(push_id: int, count: int) -> int:
    """Counter value for "count buckets of push `push_id`": monotonic across pushes."""
    return ((push_id + 1) << COUNT_BITS) | count


def seq_push(value: int) -> int:
    return (value >> COUNT_BITS) - 1


def fence() -> None:
    """Order earlier memory accesses before later ones as the peer process sees them.

    x86 keeps stores (and loads) in program order already; on weakly ordered CPUs a lock
    release followed by an acquire is a full barrier, so two lock round trips do it.
    """
    with _FENCE:
        pass
    with _FENCE:
        pass


class Backoff:
    """Poll pacing: a few quick re-checks, then sleeps of 50 growing to 200 microseconds."""

    def __init__(self) -> None:
        self.rounds = 0

    def pause(self) -> None:
        self.rounds += 1
        if self.rounds > 16:
            time.sleep(min(200e-6, 50e-6 * (1 + (self.rounds - 16) // 64)))


class Segment:
    """A named POSIX shm segment mapped into this process; the creator unlinks it on close.

    The creator keeps the file open with an exclusive flock until `close`: the lock is what
    tells `remove_orphan_segments` the segment is live (see there why not the pid), and what
    lets a reader opened with `watch` see at once that the creator is gone
    (`creator_alive`).
    """

    def __init__(
        self, name: str, nbytes: int | None = None, *, create: bool = False, watch: bool = False
    ):
        if not _NAME.fullmatch(name):
            raise TransportError(f"shm: invalid segment name {name!r}")
        self.name, self.owner = name, create
        path = os.path.join(SHM_DIR, name)
        fd = _open(name, path, create)
        self._lock_fd: int | None = fd if create else None
        self._watch_fd: int | None = fd if watch and not create else None
        try:
            if create:
                # Blocking: a cleaner may hold the lock for an instant while it looks at the
                # still empty file. Taken before the file gets a size, so that a sized file
                # nobody locks is one whose creator is gone.
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.nbytes = self._size(fd, nbytes, create)
            # MAP_POPULATE maps every page now, so no push pays first-touch page faults.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.mm: mmap.mmap | None = mmap.mmap(fd, self.nbytes, flags=flags)
        except BaseException:
            if create:
                os.unlink(path)
            os.close(fd)
            raise
        if not create and not watch:
            os.close(fd)

    def creator_alive(self) -> bool:
        """Whether the creator still holds the segment: a shared lock on our own open file
        succeeds only once its exclusive one is gone (the kernel drops it when the creator
        dies, however it dies). True when not opened with `watch` (nothing to tell by)."""
        if self._watch_fd is None:
            return True
        try:
            fcntl.flock(self._watch_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._watch_fd, fcntl.LOCK_UN)
        return False

    def _size(self, fd: int, nbytes: int | None, create: bool) -> int:
        if create:
            assert nbytes is not None and nbytes > 0
            # Reserve every page now: with a bare ftruncate a full /dev/shm only shows up as
            # SIGBUS on the first write to a page that could not be allocated.
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                raise TransportError(
                    f"shm {self.name}: cannot allocate {nbytes} bytes in "
                    f"{SHM_DIR} ({e.strerror}); free space there or use "
                    f"smaller buckets / fewer slots"
                ) from None
            return nbytes
        size = os.fstat(fd).st_size
        if size <= 0 or (nbytes is not None and size != nbytes):
            raise TransportError(f"shm {self.name}: size {size} != expected {nbytes}")
        return size

    def tensor(self) -> torch.Tensor:
        assert self.mm is not None, "segment closed"
        return torch.frombuffer(self.mm, dtype=torch.uint8)

    def close(self) -> None:
        """Unmap (once no tensor views remain) and, for the creator, unlink the name."""
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                pass
            self.mm = None
        if self.owner:
            self.owner = False
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:  # after the unlink: never a named, unlocked segment
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None


def _open(name: str, path: str, create: bool) -> int:
    """The segment's fd. Never through a symbolic link (O_NOFOLLOW: a name from the wire
    must not make us map, or write, some other file), and, when not ours to create, only a
    regular file that belongs to this process's user (someone else's file in the shared
    /dev/shm is not a segment of ours, whatever its name)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TransportError(f"shm {name}: is a symbolic link; refused") from None
        raise TransportError(f"shm {name}: cannot open ({e})") from e
    if create:
        return fd
    info = os.fstat(fd)
    why = ""
    if not stat.S_ISREG(info.st_mode):
        why = "not a regular file"
    elif info.st_uid != os.geteuid():
        why = f"owned by uid {info.st_uid}, not this process's user (uid {os.geteuid()})"
    if why:
        os.close(fd)
        raise TransportError(f"shm {name}: {why}; refused")
    return fd


def new_segment_name(role: str) -> str:
    return f"{PREFIX}-{os.getpid()}-{secrets.token_hex(6)}-{role}"


def remove_orphan_segments() -> list[str]:
    """Unlink rlsync segments whose creating process is gone (e.g. a SIGKILLed trainer).

    A segment is an orphan when nobody holds its flock and it has a size. Its creator locks
    it before giving it a size and keeps the lock until it unlinks it; the kernel releases
    the lock when the creator dies, however it dies. The pid in the name is NOT evidence:
    containers sharing /dev/shm (`--ipc=host`) each have their own pid namespace, so a live
    creator in another one has no /proc/<pid> here (or someone else's). A flock lives on the
    file itself, so it holds across namespaces. Children forked by the creator inherit the
    lock (the segment stays while they live, which errs on the safe side); exec'd children
    do not (Python fds are non-inheritable). An empty unlocked file may be one a creator is
    about to lock, so it is left alone (one killed in that instant leaves 0 bytes).
    """
    removed = []
    for name in os.listdir(SHM_DIR):
        if _OWN_NAME.fullmatch(name) and _is_orphan(os.path.join(SHM_DIR, name)):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _is_orphan(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # gone already, or not ours to open
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its creator (in whatever pid namespace) still holds it
    else:
        return os.fstat(fd).st_size > 0
    finally:
        os.close(fd)  # releases our lock too


class Control:
    """The counters shared by one sender and its engines: int64 words in a small segment,
    each written by one side only (the protocol is drawn in `ipc`). Per engine, one 64-byte
    line: consumed, opened, declined (the engine's words), evicted, member (the sender's)."""

    def __init__(self, seg: Segment):
        self.seg = seg
        self.words = memoryview(seg.mm).cast("q")  # aligned 8-byte loads/stores: atomic
        self.num_engines = (len(self.words) - _HDR_WORDS) // _ENGINE_WORDS

    @classmethod
    def create(cls, num_engines: int) -> Control:
        nbytes = 8 * (_HDR_WORDS + _ENGINE_WORDS * num_engines)
        ctl = cls(Segment(new_segment_name("ctl"), nbytes, create=True))
        ctl.words[_ENGINES_W], ctl.words[_PID_W] = num_engines, os.getpid()
        fence()
        ctl.words[_MAGIC_W] = _MAGIC
        return ctl

    @classmethod
    def open(cls, buffer: IpcBuffer) -> Control:
        """Map the control segment a descriptor names and check it matches the descriptor."""
        ctl = cls(Segment(buffer.control_name, watch=True))
        magic = ctl.words[_MAGIC_W]
        if magic != _MAGIC or buffer.engine_index >= ctl.num_engines:
            ctl.close()
            raise TransportError(
                f"shm {buffer.control_name}: control segment (magic {magic:#x}, "
                f"{ctl.num_engines} engines) does not match engine {buffer.engine_index}'s "
                f"descriptor (magic {_MAGIC:#x}: another rlsync version, or not a control "
                f"segment)"
            )
        return ctl

    @property
    def name(self) -> str:
        return self.seg.name

    @property
    def sender_pid(self) -> int:
        return self.words[_PID_W]

    def sender_alive(self) -> bool:
        """False once the segment's creator (the sender) is gone (see `Segment.creator_alive`)."""
        return self.seg.creator_alive()

    def ready(self) -> int:
        return self.words[_READY_W]

    def set_ready(self, value: int) -> None:
        self.words[_READY_W] = value

    def aborted(self) -> int:
        return self.words[_ABORTED_W]

    def set_aborted(self, push_id: int) -> None:
        self.words[_ABORTED_W] = push_id + 1

    def consumed(self, engine: int) -> int:
        return self.words[_HDR_WORDS + _ENGINE_WORDS * engine]

    def set_consumed(self, engine: int, value: int) -> None:
        self.words[_HDR_WORDS + _ENGINE_WORDS * engine] = value

    def opened(self, engine: int) -> int:
        """seq(push, 0) once the engine's store may be written for that push (direct pushes:
        the engine's receive has begun, so it is paused or writing its shadow)."""
        return self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 2]

    def set_opened(self, engine: int, value: int) -> None:
        self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 2] = value

    def evicted(self, engine: int) -> int:
        """push_id + 1 of the last push the sender gave up on this engine in (0: never)."""
        return self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 1]

    def evict(self, engine: int, push_id: int) -> None:
        self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 1] = push_id + 1

    def member(self, engine: int) -> int:
        """push_id + 1 of the last push the sender named this engine in (sender's word,
        written before that push starts: an engine not named commits nothing of it)."""
        return self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 3]

    def set_member(self, engine: int, push_id: int) -> None:
        self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 3] = push_id + 1

    def declined(self, engine: int) -> int:
        """push_id + 1 of the last push this engine said it is out of (its word: it failed
        before it took its part, e.g. its wait for idle ran out; the sender stops waiting)."""
        return self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 4]

    def set_declined(self, engine: int, push_id: int) -> None:
        self.words[_HDR_WORDS + _ENGINE_WORDS * engine + 4] = push_id + 1

    def close(self) -> None:
        self.words.release()
        self.seg.close()


# ---------------------------------------------------------------- data buffer geometry


def region_bytes(nbytes: int) -> int:
    """Bytes one bucket occupies in the data buffer: payload + trailer, 256-aligned."""
    return align_up(nbytes + TRAILER_BYTES, REGION_ALIGN)


def packed_bytes(plan: BucketPlan) -> int:
    return sum(region_bytes(b.nbytes) for b in plan.buckets)


def geometry(plan: BucketPlan | None, capacity_bytes: int | None) -> int:
    """Bytes of a data buffer that holds every bucket of `plan` one after the other, and at
    least `capacity_bytes`."""
    if plan is None and capacity_bytes is None:
        raise ValueError("give a plan or capacity_bytes")
    nbytes = max(capacity_bytes or 0, packed_bytes(plan) if plan else 0)
    return align_up(nbytes, REGION_ALIGN)


def layout(plan: BucketPlan, capacity: int) -> list[int]:
    """Byte offset of each bucket in the data buffer (bucket g after buckets 0..g-1, so a
    whole push fits and the sender never waits on engines within one); raises if the plan
    does not fit."""
    if len(plan.buckets) >= 1 << COUNT_BITS:
        raise TransportError(f"ipc: {len(plan.buckets)} buckets exceed the counter range")
    offsets, end = [], 0
    for bucket in plan.buckets:
        offsets.append(end)
        end += region_bytes(bucket.nbytes)
    if end > capacity:
        raise TransportError(f"ipc: plan needs {end} bytes, the buffer holds {capacity}")
    return offsets
