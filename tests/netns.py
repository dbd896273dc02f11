"""Test helper: a second "host" on this machine, a network namespace joined to this one by a veth pair.

Created and removed by the test that uses it; ``Host.available()`` says why not where `ip netns` cannot run.
Only addresses this helper makes are used (10.231.x.0/30).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@dataclass
class Host:
    name: str
    address: str  # the namespace's end of the veth pair
    peer_address: str  # this (the default) namespace's end

    @staticmethod
    def unavailable() -> str | None:
        """Why a namespace cannot be made here, or None."""
        if shutil.which("ip") is None:
            return "needs iproute2's `ip` (apt-get install iproute2)"
        if os.geteuid() != 0:
            return "needs root to create network namespaces"
        probe = f"cpprobe{os.getpid()}"
        made = _ip("netns", "add", probe)
        if made.returncode:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        _ip("netns", "del", probe)
        return None

    @classmethod
    def create(cls, index: int = 1) -> Host:
        tag = f"{os.getpid() % 10000}x{index}"
        name, outer, inner = f"cphost{tag}", f"cpo{tag}", f"cpi{tag}"
        subnet = 10 + (os.getpid() % 60) * 4 + index
        host = cls(name, f"10.231.{subnet}.2", f"10.231.{subnet}.1")
        steps = [
            ("netns", "add", name),
            ("link", "add", outer, "type", "veth", "peer", "name", inner),
            ("link", "set", inner, "netns", name),
            ("addr", "add", f"{host.peer_address}/30", "dev", outer),
            ("link", "set", outer, "up"),
            ("-n", name, "addr", "add", f"{host.address}/30", "dev", inner),
            ("-n", name, "link", "set", inner, "up"),
            ("-n", name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode:
                host.remove()
                raise RuntimeError(f"ip {' '.join(step)}: {done.stderr.strip()}")
        return host

    def prefix(self) -> list[str]:
        """Run a command in this host: put this before its argv."""
        return ["ip", "netns", "exec", self.name]

    def remove(self) -> None:
        _ip("netns", "del", self.name)  # the veth pair goes with it
