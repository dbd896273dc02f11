"""The guest firmware image: where to find it, its symbols, its SHA-256.

The installed package carries it in confplan/_firmware/; a source tree falls back to firmware/build/.
Entry points and section bounds come from confplan-fw.sym (``nm`` output), never hard-coded here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from confplan.errors import EnvironmentProblem
from confplan.vmm import abi

_PACKAGE_DIR = Path(__file__).resolve().parent.parent / "_firmware"
_SOURCE_DIR = Path(__file__).resolve().parents[2] / "firmware" / "build"
IMAGE, SYMBOLS = "confplan-fw.bin", "confplan-fw.sym"

REQUIRED_SYMBOLS = (
    "isr_stubs", "isr_stubs_end", "wl_entry", "mh_entry", "__boot_start", "__boot_end",
    "__utext_start", "__utext_end", "__udata_start", "__udata_end", "__mh_start", "__mh_end", "ABI_version",
)  # fmt: skip


def search_dirs() -> list[Path]:
    return [_PACKAGE_DIR, _SOURCE_DIR]


def parse_symbols(text: str) -> dict[str, int]:
    """``nm`` lines (``ADDRESS TYPE NAME``) to name -> address."""
    symbols: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return symbols


@dataclass(frozen=True)
class Firmware:
    path: Path
    image: bytes
    symbols: dict[str, int]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()

    def sym(self, name: str) -> int:
        return self.symbols[name]

    @classmethod
    def load(cls, directory: Path | None = None) -> Firmware:
        """Load the image from ``directory`` or the first search dir that has a complete, built one."""
        candidates = [directory] if directory is not None else search_dirs()
        for d in candidates:
            if (d / IMAGE).is_file() and (d / SYMBOLS).is_file():
                return cls._from_dir(d)
        tried = ", ".join(str(d) for d in candidates)
        raise EnvironmentProblem(
            f"the guest firmware is not built (looked for {IMAGE} and {SYMBOLS} in {tried})",
            hint="run `make -C firmware` in the source tree, or reinstall confplan",
        )

    @classmethod
    def _from_dir(cls, d: Path) -> Firmware:
        symbols = parse_symbols((d / SYMBOLS).read_text())
        image = (d / IMAGE).read_bytes()
        missing = [name for name in REQUIRED_SYMBOLS if name not in symbols]
        if missing:
            raise EnvironmentProblem(
                f"firmware in {d} lacks symbols {', '.join(missing)} (an old or foreign build)",
                hint="rebuild it with `make -C firmware`, or reinstall confplan",
            )
        if symbols["ABI_version"] != abi.ABI_VERSION:
            raise EnvironmentProblem(
                f"firmware in {d} has guest ABI v{symbols['ABI_version']}, "
                f"this VMM speaks v{abi.ABI_VERSION}",
                hint="rebuild it with `make -C firmware`, or reinstall confplan",
            )
        if abi.FW_BASE + len(image) > abi.MH_BASE + abi.MH_IMAGE_SIZE:
            raise EnvironmentProblem(f"firmware image in {d} is too large ({len(image)} bytes)")
        return cls(path=d / IMAGE, image=image, symbols=symbols)
