"""Test helper: a real `confplan agent` process with its own home, and an orchestrator home enrolled in it.

``Agent.start`` enrols the orchestrator's identity (made in ``orchestrator_home``) in the agent's trust
before the agent starts, starts `python -m confplan agent --listen HOST:0 --home AGENT_HOME`, and reads the
port and the fingerprint from its first line. Tests set CONFPLAN_HOME to ``orchestrator_home`` so the
orchestrator in the test process uses that identity.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from confplan.transport import Identity, Role, TrustStore


@dataclass
class Agent:
    process: subprocess.Popen[str]
    host: str
    port: int
    fingerprint: str
    home: Path
    orchestrator_home: Path

    @classmethod
    def start(
        cls, tmp: Path, *, host: str = "127.0.0.1", enrol: bool = True, prefix: list[str] | None = None,
        port: int = 0,
    ) -> Agent:
        home, orchestrator = tmp / "agent-home", tmp / "orchestrator-home"
        if enrol:
            me = Identity.load_or_create(orchestrator, Role.ORCHESTRATOR)
            TrustStore.at_home(home).add(Role.ORCHESTRATOR, me.pem)
        argv = [*(prefix or []), sys.executable, "-m", "confplan", "agent", "--listen", f"{host}:{port}",
                "--home", str(home)]  # fmt: skip
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        first = process.stdout.readline().split()  # "listening PORT on HOST as agent sha256:..."
        assert first and first[0] == "listening", f"the agent did not start: {first}"
        return cls(process, host, int(first[1]), first[-1], home, orchestrator)

    def log(self) -> str:
        path = self.home / "agent" / "agent.log"
        return path.read_text() if path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The agent's log once it holds ``text`` (its threads write a moment after they refuse)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
