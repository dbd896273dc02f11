"""``python -m confplan.agent --socket PATH --psp-dir DIR``: the VMM child that ``confplan apply`` starts.

The same as ``confplan vmm``, without loading the CLI (typer, the plan models, pydantic): a VMM process
keeps ~15 MiB less beyond guest RAM that way (issue 5 allows 64 MiB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from confplan.agent.main import run_vmm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m confplan.agent", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True, help="unix socket to serve the control RPC on")
    parser.add_argument("--psp-dir", type=Path, required=True, help="the emulated secure processor's keys")
    parser.add_argument("--firmware", type=Path, default=None, help="folder with another firmware build")
    parser.add_argument("--plan", default=None, help="the plan this VMM serves (other plans are refused)")
    args = parser.parse_args(argv)
    return run_vmm(args.socket, psp_dir=args.psp_dir, firmware_dir=args.firmware, control_fd=None,
                   plan=args.plan)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
