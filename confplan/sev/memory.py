"""The guest memory as the emulated secure processor sees it: an abstract writable byte target.

The VMM's ``Machine`` satisfies ``GuestMemory``; tests use ``BytearrayGuestMemory``. Addresses are guest
physical addresses (GPAs); the secure processor never needs more than ``read`` and ``write``.
"""

from __future__ import annotations

from typing import Protocol

from confplan.errors import ConfplanError


class GuestMemory(Protocol):
    """What the secure processor needs from guest RAM."""

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa``."""

    def read(self, gpa: int, n: int) -> bytes:
        """Return ``n`` bytes from ``gpa``."""


class BytearrayGuestMemory:
    """Guest RAM held in a bytearray, GPA 0 at offset 0 (for tests and offline tools)."""

    def __init__(self, size: int) -> None:
        self.ram = bytearray(size)

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > len(self.ram):
            raise ConfplanError(
                f"guest memory access [{gpa:#x}, {gpa + n:#x}) is outside the {len(self.ram):#x}-byte RAM",
                hint="check the GPA the VMM passed to the secure processor",
            )

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        self.ram[gpa : gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        return bytes(self.ram[gpa : gpa + n])
