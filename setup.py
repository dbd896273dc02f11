"""Build steps that pyproject.toml cannot express: the guest firmware and the C page-transfer core.

``pip install -e .`` (and a wheel build) runs ``build_ext``, which here
1. builds the firmware with ``make -C firmware`` (freestanding C, reproducible) and copies the image into
   ``confplan/_firmware/`` so the installed package carries it, and
2. compiles ``confplan/core/pagecore.c`` into a plain shared library that ``confplan.core`` loads with
   ctypes (it is not a CPython extension: it has no Python API calls and no PyInit symbol).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
FIRMWARE_ARTIFACTS = ("confplan-fw.bin", "confplan-fw.elf", "confplan-fw.sym")


class BuildFirmwareAndCore(build_ext):
    """build_ext that also builds the firmware image and ships it inside the package."""

    def run(self) -> None:
        self._build_firmware()
        super().run()

    def _build_firmware(self) -> None:
        subprocess.run(["make", "-C", str(ROOT / "firmware"), "--no-print-directory"], check=True)
        built = ROOT / "firmware" / "build"
        destinations = [ROOT / "confplan" / "_firmware"]
        if not self.inplace and self.build_lib:
            destinations.append(Path(self.build_lib) / "confplan" / "_firmware")
        for dest in destinations:
            dest.mkdir(parents=True, exist_ok=True)
            for name in FIRMWARE_ARTIFACTS:
                if (built / name).exists():
                    shutil.copy2(built / name, dest / name)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library: nothing named PyInit_* to export

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()


pagecore = Extension(
    "confplan.core._pagecore",
    sources=["confplan/core/pagecore.c", "confplan/core/datapath.c", "confplan/core/rearm.c",
             "confplan/core/helper_run.c"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fvisibility=default"],
)

setup(ext_modules=[pagecore], cmdclass={"build_ext": BuildFirmwareAndCore})
