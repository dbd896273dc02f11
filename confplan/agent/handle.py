"""The orchestrator's handle on a VMM process: start a local one, find it again, or reach a remote agent.

A local VMM is started detached (its own session) with a unix socket in the checkpoint folder,
``<dir>/vmm-<role>.sock``, and its log beside it. A later apply finds it through that socket, so the
source guest outlives an orchestrator that crashed or was interrupted.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from confplan.errors import ConfplanError, PlanBusy
from confplan.rpc import RpcClient, RpcError
from confplan.rpc.client import greeted
from confplan.sev.certs import PlatformChain
from confplan.sev.launch_crypto import PlatformVersion
from confplan.transport import sockets
from confplan.transport.files import private_dir

START_TIMEOUT = 15.0
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # VMMs this process started, to tell how they ended
_OOM_KILLS_AT_START: dict[int, int | None] = {}  # the host's OOM-kill count when each VMM started
VMSTAT = "/proc/vmstat"


def oom_kills(vmstat: str = VMSTAT) -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (``oom_kill`` in /proc/vmstat,
    Linux 4.13+); None where the kernel does not say."""
    try:
        with open(vmstat, encoding="ascii") as lines:
            for line in lines:
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def _oom_suspected(pid: int | None) -> str | None:
    """Why a VMM killed by SIGKILL was probably killed for memory, or None: the OOM killer struck since
    it started, or this host has little memory left now."""
    from confplan.vmm.memory import mem_available

    before, now = _OOM_KILLS_AT_START.get(pid or -1), oom_kills()
    if before is not None and now is not None and now > before:
        return f"the kernel's OOM killer killed {now - before} process(es) since it started"
    avail = mem_available()
    if avail is not None and avail < 256 << 20:
        return f"only {avail >> 20} MiB of memory is available on this host now"
    return None


def socket_path(directory: Path, role: str) -> Path:
    return directory / f"vmm-{role}.sock"


def log_path(directory: Path, role: str) -> Path:
    return directory / f"vmm-{role}.log"


def _last_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1] if lines else None


class VmmHandle:
    """RPC to one VMM process. ``describe_end`` tells how it went away, for error messages."""

    def __init__(
        self, client: RpcClient, *, role: str, pid: int | None, log: Path | None, plan: str | None = None,
        peer_fingerprint: str | None = None,
    ) -> None:  # fmt: skip
        self.client, self.role, self.pid, self.log, self.plan = client, role, pid, log, plan
        self.peer_fingerprint = peer_fingerprint  # a remote agent's certificate, as seen in the handshake

    @property
    def name(self) -> str:
        return f"the {self.role} VMM process" + (f" (pid {self.pid})" if self.pid else "")

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60.0) -> Any:
        return self.client.call(method, params or {}, timeout=timeout)

    def alive(self) -> bool:
        try:
            self.client.call("info", {}, timeout=5.0)
        except RpcError:
            return False
        return True

    def close(self) -> None:
        self.client.close()

    def launch_peer(self) -> RpcLaunchPeer:
        """This VMM's measured launch as the owner's broker drives it (``sev.owner.LaunchPeer``)."""
        return RpcLaunchPeer(self)


class RpcLaunchPeer:
    """``sev.owner.LaunchPeer`` and ``sev.owner.SnpPeer`` over a VMM's RPC: platform_chain, launch_measure,
    launch_secret; snp_launch, snp_chain, key_request, key_release."""

    def __init__(self, handle: VmmHandle) -> None:
        self._handle = handle

    def platform(self) -> tuple[PlatformChain, PlatformVersion]:
        doc = self._handle.call("platform_chain")
        return PlatformChain.unpack(base64.b64decode(doc["chain"])), PlatformVersion(*doc["version"])

    def measure(self, policy: int, godh_cert: bytes, session_blob: bytes) -> bytes:
        answer = self._handle.call("launch_measure", {
            "policy": policy, "godh": _b64(godh_cert), "session": _b64(session_blob),
        })  # fmt: skip
        return base64.b64decode(answer["measurement"])

    def inject_secret(self, header: bytes, ciphertext: bytes) -> None:
        self._handle.call("launch_secret", {"header": _b64(header), "ciphertext": _b64(ciphertext)})

    # ---- sev.owner.SnpPeer: the SEV-SNP launch and key release (docs/key-release.md) ----
    def snp_launch(self, policy: int) -> bytes:
        return base64.b64decode(self._handle.call("snp_launch", {"policy": policy})["measurement"])

    def snp_chain(self) -> tuple[bytes, bytes, bytes]:
        doc = self._handle.call("snp_chain")
        return base64.b64decode(doc["ark"]), base64.b64decode(doc["ask"]), base64.b64decode(doc["vcek"])

    def key_request(self, nonce: bytes) -> bytes:
        return base64.b64decode(self._handle.call("key_request", {"nonce": _b64(nonce)})["report"])

    def key_release(self, wrapped: bytes) -> None:
        self._handle.call("key_release", {"wrapped": _b64(wrapped)})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def describe_end(pid: int | None, log: Path | None) -> str:
    """'was killed by SIGKILL: <last log line>' and the like."""
    how = "closed the connection"
    child = _CHILDREN.get(pid or -1)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = child.wait(timeout=2.0)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            if code < 0:
                how = f"was killed by {signal.Signals(-code).name}"
            why = _oom_suspected(pid) if code == -signal.SIGKILL else None
            if why is not None:
                how += (f": probably out of memory ({why}); free memory on this host or lower "
                        "guest.memory in the plan")  # fmt: skip
    elif pid is not None and not _pid_alive(pid):
        how = "has exited"
    last = _last_line(log) if log is not None else None
    return f"{how} (last log line: {last})" if last else how


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def vmm_alive(pid: int) -> bool | None:
    """Is ``pid`` a live confplan VMM process (not a dead one, a zombie, or a recycled pid now running
    something else)? None when this host cannot tell (no /proc). ``confplan status`` reports with it."""
    if not _pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False  # exited just now
    except OSError:
        return None
    if stat.rpartition(")")[2].split()[0] in ("Z", "X"):  # the state field, after the command's name
        return False
    return b"confplan" in cmdline


def _connect_unix(path: Path, role: str, pid: int | None, log: Path) -> VmmHandle:
    sock = sockets.dial_unix(path)
    holder: dict[str, int | None] = {"pid": pid}
    client = RpcClient(
        sock, peer=f"the {role} VMM process", describe_gone=lambda: describe_end(holder["pid"], log)
    )
    try:
        client.hello(10.0)
        info = client.call("info", {}, timeout=10.0)
    except BaseException:
        client.close()
        raise
    holder["pid"] = int(info["pid"])
    client.peer = f"the {role} VMM process (pid {info['pid']})"
    return VmmHandle(client, role=role, pid=int(info["pid"]), log=log, plan=info.get("plan"))


def find_local(directory: Path, role: str, *, plan: str | None = None) -> VmmHandle | None:
    """The VMM serving ``<dir>/vmm-<role>.sock``, or None when nothing answers there. With ``plan``: a VMM
    of another plan there is refused (``PlanBusy``), never used or stopped on this plan's behalf."""
    path = socket_path(directory, role)
    if not path.exists():
        return None
    try:
        handle = _connect_unix(path, role, None, log_path(directory, role))
    except (OSError, RpcError):
        return None
    if plan is not None and handle.plan not in (None, plan):
        handle.close()
        raise PlanBusy(
            f"{directory} holds the {role} VMM (pid {handle.pid}) of plan {handle.plan!r}, not of {plan!r}",
            hint=f"give plan {plan!r} its own checkpoint.dir (the default is one folder per plan); "
            "plans never touch each other's VMMs",
        )
    return handle


def start_local(
    directory: Path, role: str, *, firmware_dir: Path | None = None, plan: str | None = None
) -> VmmHandle:
    """Start a VMM process (``python -m confplan.agent``, i.e. ``confplan vmm``) for ``role`` of ``plan``
    detached, wait for its socket, connect. An old VMM of the same plan there is stopped; another plan's
    is refused."""
    private_dir(directory, use="the plan's checkpoint folder")
    path, log = socket_path(directory, role), log_path(directory, role)
    old = find_local(directory, role, plan=plan)
    if old is not None:
        stop(old)
    argv = [
        sys.executable,
        "-m",
        "confplan.agent",  # = `confplan vmm`, without loading the CLI (less memory per VMM)
        "--socket",
        str(path),
        "--psp-dir",
        str(directory / "psp"),
    ]
    if firmware_dir is not None:
        argv += ["--firmware", str(firmware_dir)]
    if plan is not None:
        argv += ["--plan", plan]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    _CHILDREN[proc.pid] = proc
    _OOM_KILLS_AT_START[proc.pid] = oom_kills()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfplanError(
                f"the {role} VMM process {describe_end(proc.pid, log)} while starting",
                hint=f"see {log}",
            )
        if path.exists():
            with contextlib.suppress(OSError):
                return _connect_unix(path, role, proc.pid, log)
        time.sleep(0.02)
    proc.kill()
    raise ConfplanError(
        f"the {role} VMM process did not serve {path} within {START_TIMEOUT:g} s", hint=f"see {log}"
    )


def connect_remote(
    host: str, port: int, role: str, *, pin: str | None = None, home: Path | None = None
) -> VmmHandle:
    """The agent at ``host:port`` over mutual TLS 1.3 (docs/channel.md): this orchestrator's identity from
    ``home`` (default ``transport.default_home()``), the agent checked against ``pin`` (the plan's
    ``fingerprint``) or, without one, against the agents enrolled in the trust store."""
    from confplan.transport import Identity, Role, TrustStore, default_home, dial
    from confplan.transport.identity import fingerprint

    home = home or default_home()
    identity = Identity.load_or_create(home, Role.ORCHESTRATOR)
    sock = dial(host, port, identity=identity, pin=pin, trust=TrustStore.at_home(home), timeout=10.0)
    der = sock.getpeercert(binary_form=True)
    client = greeted(RpcClient(sock, peer=f"the {role} agent at {host}:{port}"), 10.0)
    try:
        info = client.call("info", {}, timeout=10.0)
    except BaseException:
        client.close()
        raise
    seen = fingerprint(der) if der else None
    return VmmHandle(client, role=role, pid=int(info["pid"]), log=None, peer_fingerprint=seen)


def stop(handle: VmmHandle, timeout: float = 10.0) -> None:
    """Ask the VMM to shut down (its guest stops) and wait until it has; a local VMM that does not (wedged
    in a dead peer, a stuck vCPU) is killed when ``timeout`` has passed."""
    with contextlib.suppress(RpcError):
        handle.call("shutdown", timeout=min(timeout, 5.0))
    handle.close()
    child = _CHILDREN.pop(handle.pid or -1, None)
    deadline = time.monotonic() + timeout
    while handle.pid is not None and time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return
        elif not _pid_alive(handle.pid):
            return
        time.sleep(0.02)
    if handle.pid is not None and handle.log is not None and _pid_alive(handle.pid):  # local, and wedged
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGKILL)
