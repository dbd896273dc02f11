"""Private files for identities and the trust store: folders 0700, files 0600, written atomically.

Like ssh with ~/.ssh, confplan refuses a private key that other users could read: by the time it is
noticed, the key may already be copied, and a quiet "fix" would hide that.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from confplan import statefile
from confplan.errors import ConfplanError

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, *, use: str) -> Path:
    """Make ``path`` (and its parents) if missing; a folder confplan makes is 0700.

    ``use`` says what the folder is for, for the message when it cannot be made or written.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        for folder in reversed(missing):  # mkdir(parents=True) would make the parents 0755
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
    except OSError as err:
        raise _unwritable(path, use, err) from None
    if not path.is_dir():
        raise _unwritable(path, use, NotADirectoryError(20, "Not a directory"))
    if not os.access(path, os.W_OK | os.X_OK):
        raise _unwritable(path, use, PermissionError(13, "Permission denied"))
    return path


def _unwritable(path: Path, use: str, err: OSError) -> ConfplanError:
    return ConfplanError(
        f"cannot use {path} for {use}: {err.strerror or err}",
        hint="pass --home DIR or set CONFPLAN_HOME to a folder this user can write",
    )


def write_private(path: Path, data: bytes, *, use: str) -> None:
    """Write ``data`` to ``path`` with mode 0600 (``statefile.write_private``: temp file, fsync, rename,
    never half a file), in a 0700 folder made for ``use``."""
    private_dir(path.parent, use=use)
    try:
        statefile.write_private(path, data)
    except OSError as err:
        raise _unwritable(path.parent, use, err) from None


def check_private(path: Path, *, what: str) -> None:
    """Refuse a secret file that another user owns or that group/others may read or write."""
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise ConfplanError(
            f"{what} {path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})",
            hint="run confplan as the user that owns it, or pass --home DIR with this user's own folder",
        )
    loose = stat.S_IMODE(info.st_mode) & 0o077
    if loose:
        raise ConfplanError(
            f"{what} {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others may read it",
            hint=(
                f"if no one else could have read it, run `chmod 600 {path}`; otherwise the key may be "
                "copied: move its folder away (a new identity is made) and enrol the new one on the peers"
            ),
        )


def read_text(path: Path, *, what: str) -> str:
    """A small text file, or a ConfplanError naming it."""
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not ASCII text"
        raise ConfplanError(f"cannot read {what} {path}: {reason or err}", hint="check the path") from None
