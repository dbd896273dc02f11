"""A source and a target helper built for the host (``host_mh``) with one transport key: the pair the
mailbox-stream and data-loop tests move pages between, PRIVATE random on the source and zero on the target."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

from confplan.migration.host_mh import SIDE_TARGET, HostGuest
from confplan.sev.secret_table import CONFPLAN_TRANSPORT_KEY_GUID, build_secret_table

PAGE = 4096
RAM = 8 << 20
PRIVATE = range(0x400000, RAM, PAGE)


@contextlib.contextmanager
def host_pair(lib: ctypes.CDLL, mh_vcpus: int = 1) -> Iterator[tuple[HostGuest, HostGuest]]:
    secret = build_secret_table({CONFPLAN_TRANSPORT_KEY_GUID: os.urandom(32)})
    with (
        HostGuest(lib, ram_size=RAM, secret=secret, mh_vcpus=mh_vcpus, timeout=10) as src,
        HostGuest(lib, ram_size=RAM, secret=secret, mh_vcpus=mh_vcpus, side=SIDE_TARGET, timeout=10) as dst,
    ):
        src.ram[PRIVATE.start : PRIVATE.stop] = os.urandom(len(PRIVATE) * PAGE)
        dst.ram[PRIVATE.start : PRIVATE.stop] = bytes(len(PRIVATE) * PAGE)
        src.mailboxes.init()
        dst.mailboxes.init()
        yield src, dst
