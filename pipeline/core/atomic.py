"""Write files so that a crash never leaves a half-written file under its final name."""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # the permissions of an ordinary new file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable, so the manifest is never on disk before the shard it lists."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def remove_stale_temporaries(folder) -> None:
    """Delete the leftovers of writes that a crash interrupted."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder, what: str):
    """Hold an exclusive lock on ``folder`` so that two runs never write it at once.

    A POSIX record lock (``lockf``), not ``flock``: forked children such as DataLoader workers do not
    inherit it, so a killed run frees its folder at once even while its workers are still exiting."""
    from .errors import UserError
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(f"another {what} is writing {folder}; wait for it to finish or use another folder") from None
        yield


# Written first into every staging folder (<reference_dir>.partial, <data_dir>.importing): only a folder that
# carries it is emptied when a run starts over, so files of the user's under such a name are never deleted.
STAGING_MARKER = ".one-step-distill-staging"


def claim_staging(staging, what: str) -> None:
    """Make ``staging`` this tool's staging folder: new, empty, or left by an interrupted run of ours (its
    marker present; emptied here but for a lock, under which a run of ours may still be working); else one sentence."""
    from .errors import UserError
    staging = Path(staging)
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise UserError(f"{staging} is not a folder, where {what} stages its files; move it away or pick another "
                        f"target folder")
    staging.mkdir(parents=True, exist_ok=True)
    entries = [p for p in staging.iterdir() if p.name not in (".lock", STAGING_MARKER)]
    if entries and not (staging / STAGING_MARKER).is_file():
        raise UserError(f"{staging} holds files that {what} did not write (no {STAGING_MARKER} marker), e.g. "
                        f"{entries[0].name}; move them away or pick another target folder")
    (staging / STAGING_MARKER).write_text(f"staging folder of {what}; deleted when it completes or reruns\n")


def empty_staging(staging) -> None:
    """Delete what an interrupted run left in a claimed staging folder (its lock and marker stay)."""
    for leftover in Path(staging).iterdir():
        if leftover.name not in (".lock", STAGING_MARKER):
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
