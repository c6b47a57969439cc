"""Advisory locks (flock(2)) that a process holds for its life: the kernel drops them however it ends (kill -9 too).

Four users: a launcher's `--output_dir` (`experiments.hold_dir_or_exit`, exclusive), a run's temporary store and
control directory (`runtime.driver.held_temp_dir`, exclusive; `held_elsewhere` is the cleanup's probe), the netns
cluster (`runtime.netns.hold_cluster`) and a bounded store's keepers (`runtime.scheduler_service.StoreKeeper`), both
shared and probed first for an exclusive lock, so that a run learns whether another run holds the lock too.

Where the file system has no flock (some NFS mounts), nothing is held and each caller goes on as it did before it
had a lock: `take` and `hold_shared` say so by returning None.
"""

from __future__ import annotations

import errno
import fcntl
import os


def open_dir(path: str) -> int:
    """A descriptor of the directory `path` to lock (no file is made in it). OSError where it cannot be opened."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_lock_file(path: str) -> int:
    """A descriptor of the lock file `path`, made (mode 0o666 less the umask) where missing. One this user cannot
    write (another user's, made under a umask of 022; a read-only mount) is opened read-only: flock(2) needs no write
    access (it held no lock and said nothing). OSError where neither opens."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def take(fd: int, *, shared: bool = False) -> bool | None:
    """Try the lock without waiting: True taken, False another process holds a lock in the way, None where this file
    system has no flock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def held_elsewhere(path: str) -> bool:
    """Whether another process holds a lock on the directory `path` now (the probe takes and drops an exclusive
    one). A directory that cannot be opened, or a file system without flock: False."""
    try:
        fd = open_dir(path)
    except OSError:
        return False
    try:
        return take(fd) is False
    finally:
        os.close(fd)  # (the probe's lock, when taken, goes with it)


def hold_shared(fd: int, *, wait_for_exclusive: bool = True) -> bool | None:
    """Hold a shared lock on `fd` after probing for an exclusive one: whether another process holds a lock on it too
    (True / False), or None where there is no flock (nothing held). An exclusive holder (not another run's brief
    probe: e.g. `netns_cluster.sh up`) is waited for, or with `wait_for_exclusive=False` BlockingIOError."""
    alone = take(fd)
    if alone is None:
        return None
    if not alone and not wait_for_exclusive and not take(fd, shared=True):
        raise BlockingIOError(f"another process holds an exclusive lock on descriptor {fd}")
    try:
        # (from exclusive to shared: not atomic, flock(2); and after the probes above, waits only for another probe)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        return None
    return not alone
