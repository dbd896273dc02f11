"""The migration helper's C engine built for the host: a stand-in guest for tests and the bench.

``build_host_library`` compiles firmware/mh/*.c + firmware/crypto (the same sources the guest image
uses) into ``libcpmh.so`` with ``make -C firmware/mh/host``. ``HostGuest`` lays out guest RAM exactly as
the firmware ABI does (secret page at CP_SECRET_GPA, mailboxes from CP_MAILBOX_GPA inside the MH area),
sets up one C context per MH vCPU and runs each ``cp_mh_serve`` loop in a thread (ctypes releases the GIL),
parked on a futex as a vCPU would be parked by the VMM. The VMM side talks to it through the real
``Mailbox`` client: it is the real protocol on both sides, only the vCPU is a thread.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import threading
from pathlib import Path
from typing import Any

from confplan.errors import EnvironmentProblem
from confplan.migration.mailbox import Mailbox
from confplan.migration.mailbox_layout import SLOT_SIZE, SLOTS_OFFSET
from confplan.migration.mailbox_set import MailboxSet
from confplan.vmm import abi

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"
HOST_BUILD_DIR = FIRMWARE_DIR / "mh" / "host"
SECRET_PAGE_SIZE = 4096
SIDE_SOURCE, SIDE_TARGET = 0, 1


class MhConfigC(ctypes.Structure):
    """struct cp_mh_config (firmware/mh/context.h)."""

    _fields_ = (
        ("ram", ctypes.c_void_p),
        ("ram_size", ctypes.c_uint64),
        ("mh_base", ctypes.c_uint64),
        ("mh_size", ctypes.c_uint64),
        ("shared", ctypes.c_void_p),
        ("gen_table", ctypes.c_void_p),
        ("gen_entries", ctypes.c_uint64),
        ("secret", ctypes.c_void_p),
        ("secret_size", ctypes.c_uint64),
        ("doorbell", ctypes.c_void_p),
        ("cpu_features", ctypes.c_uint32),
        ("side", ctypes.c_uint32),
        ("mh_index", ctypes.c_uint32),
        ("batch_pages", ctypes.c_uint32),
        ("snp", ctypes.c_uint32),  # (v6) an SNP guest: the secret page is the PSP's secrets page
        ("mac_table", ctypes.c_void_p),
        ("mac_entries", ctypes.c_uint64),
        ("vmsa", ctypes.c_void_p),
        ("vmsa_slots", ctypes.c_uint64),
        ("own_low", ctypes.c_uint64 * 8),  # (v7, v8: 8 words) the MH's own low pages: none on the host
        ("owner_key", ctypes.c_uint8 * 32),  # (ABI v9) an SNP guest: the owner's static X25519 public key
    )


_vp, _u32, _u64, _sz = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
PROTOTYPES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "cp_mh_ctx_size": (_sz, ()),
    "cp_mh_shared_size": (_sz, ()),
    "cp_mh_features_from_bp": (_u32, (_u32,)),
    "cp_mh_setup": (_u32, (_vp, ctypes.POINTER(MhConfigC))),
    "cp_mh_handle": (_u32, (_vp, _vp, _vp)),
    "cp_mh_serve": (ctypes.c_int, (_vp, _vp, _vp, _vp, _vp)),
    "cp_mh_parse_secret": (_u32, (_vp, _u64, _vp, _vp, ctypes.POINTER(_u32))),
    "cp_mh_host_idle_size": (_sz, ()),
    "cp_mh_host_kick": (None, (_vp,)),
    "cp_mh_host_wait_done": (ctypes.c_int, (_vp, _u64, ctypes.c_int64)),
    "cp_mh_host_stop": (None, (_vp, _vp)),
    "cp_cpu_features_from_cpuid": (_u32, (_u32, _u32, _u32, _u64)),
    "cp_gcm_pick_impl": (_u32, (_u32,)),
}


def build_host_library(out_dir: Path) -> ctypes.CDLL:
    """Compile and load ``out_dir/libcpmh.so``. Raises EnvironmentProblem when make or gcc fails."""
    if not (HOST_BUILD_DIR / "Makefile").exists():
        raise EnvironmentProblem(
            f"no firmware sources at {FIRMWARE_DIR}", hint="run from a confplan source checkout"
        )
    proc = subprocess.run(
        ["make", "-s", "-C", str(HOST_BUILD_DIR), f"O={out_dir.resolve()}", "lib"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise EnvironmentProblem(
            f"building the host MH library failed:\n{proc.stderr[-2000:]}", hint="install gcc and make"
        )
    lib = ctypes.CDLL(str(out_dir / "libcpmh.so"))
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def host_cpu_features(lib: ctypes.CDLL) -> int:
    """The CP_CPU_* word for this host, from /proc/cpuinfo (what the VMM derives from CPUID)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    leaf1 = (1 << 25 if "aes" in flags else 0) | (2 if "pclmulqdq" in flags else 0)
    leaf1 |= (1 << 9 if "ssse3" in flags else 0) | (1 << 19 if "sse4_1" in flags else 0)
    leaf1 |= 1 << 30 if "rdrand" in flags else 0
    leaf7b = 1 << 5 if "avx2" in flags else 0
    avx512 = (("avx512f", 16), ("avx512bw", 30), ("avx512vl", 31))
    leaf7b |= sum(1 << bit for flag, bit in avx512 if flag in flags)
    leaf7c = (1 << 9 if "vaes" in flags else 0) | (1 << 10 if "vpclmulqdq" in flags else 0)
    xcr0 = (0xE7 if "avx512f" in flags else 7) if "avx" in flags else 1  # what Linux enables for processes
    return int(lib.cp_cpu_features_from_cpuid(leaf1, leaf7b, leaf7c, xcr0))


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


class HostGuest:
    """One side's guest RAM and its MH vCPUs as threads running the C serve loop."""

    def __init__(
        self, lib: ctypes.CDLL, *, ram_size: int, secret: bytes, mh_vcpus: int = 1, batch_pages: int = 64,
        side: int = SIDE_SOURCE, cpu_features: int | None = None, timeout: float = 30.0, vcpus: int = 1,
        snp: bool = False, owner_key: bytes = bytes(32),
    ) -> None:  # fmt: skip
        self.lib, self.ram_size, self.batch_pages = lib, ram_size, batch_pages
        self.stride = SLOTS_OFFSET + _round_up(batch_pages * SLOT_SIZE, abi.PAGE)
        self.mh_base = abi.MH_BASE
        self.mh_size = _round_up(abi.MAILBOX_GPA + mh_vcpus * self.stride, abi.HUGE) - abi.MH_BASE
        if self.mh_base + self.mh_size >= ram_size or len(secret) > SECRET_PAGE_SIZE:
            raise ValueError(f"{ram_size} bytes of RAM leave no room after the MH area")
        self.ram = mmap.mmap(-1, ram_size)
        self._ram_c = (ctypes.c_uint8 * ram_size).from_buffer(self.ram)
        self.ram_address = ctypes.addressof(self._ram_c)
        self.ram[abi.SECRET_GPA : abi.SECRET_GPA + len(secret)] = secret
        self._shared = ctypes.create_string_buffer(int(lib.cp_mh_shared_size()))
        self._gen = (ctypes.c_uint32 * (ram_size // abi.PAGE))()
        self._macs = (ctypes.c_uint8 * (ram_size // abi.PAGE * abi.MH_MAC_ENTRY))()
        self.vcpus = vcpus  # the guest's vCPUs: one VMSA slot each
        self._vmsa = (abi.VmsaSlot * vcpus)()
        features = host_cpu_features(lib) if cpu_features is None else cpu_features
        self.snp = snp  # (v6) ``secret`` is then the PSP's secrets page (VMPCK0 at 0x20)
        self.owner_key = owner_key  # (ABI v9) what the measured boot parameters would carry
        self._ctxs = [self._setup(i, side, features) for i in range(mh_vcpus)]
        self._idles = [ctypes.create_string_buffer(int(lib.cp_mh_host_idle_size())) for _ in range(mh_vcpus)]
        self._threads: list[threading.Thread] = []
        self.mailboxes = MailboxSet([self._mailbox(i, timeout) for i in range(mh_vcpus)])
        for i in range(mh_vcpus):
            self._start(i)

    def mailbox_gpa(self, index: int) -> int:
        return int(abi.MAILBOX_GPA + index * self.stride)

    def _setup(self, index: int, side: int, features: int) -> ctypes.Array[ctypes.c_char]:
        ctx = ctypes.create_string_buffer(int(self.lib.cp_mh_ctx_size()))
        cfg = MhConfigC(
            self.ram_address, self.ram_size, self.mh_base, self.mh_size, ctypes.addressof(self._shared),
            ctypes.addressof(self._gen), len(self._gen), self.ram_address + abi.SECRET_GPA, SECRET_PAGE_SIZE,
            None, features, side, index, self.batch_pages, int(self.snp), ctypes.addressof(self._macs),
            self.ram_size // abi.PAGE, ctypes.addressof(self._vmsa), self.vcpus,
        )  # fmt: skip
        cfg.owner_key[:] = self.owner_key
        rc = self.lib.cp_mh_setup(ctx, ctypes.byref(cfg))
        if rc != 0:
            raise RuntimeError(f"cp_mh_setup for MH vCPU {index} returned {rc}")
        return ctx

    def _mailbox(self, index: int, timeout: float) -> Mailbox:
        gpa = self.mailbox_gpa(index)
        ctl = self.ram_address + gpa
        view = memoryview(self.ram)[gpa : gpa + self.stride]

        def wait(seq: int, seconds: float) -> None:
            self.lib.cp_mh_host_wait_done(ctl, seq, int(min(seconds, 1.0) * 1e9))

        return Mailbox(
            view, mh_index=index, batch_pages=self.batch_pages, kick=lambda: self.lib.cp_mh_host_kick(ctl),
            wait=wait, timeout=timeout,
        )  # fmt: skip

    def _start(self, index: int) -> None:
        gpa = self.mailbox_gpa(index)
        args = (self._ctxs[index], self.ram_address + gpa, self.ram_address + gpa + SLOTS_OFFSET,
                ctypes.cast(self.lib.cp_mh_host_idle, ctypes.c_void_p), self._idles[index])  # fmt: skip
        thread = threading.Thread(target=self.lib.cp_mh_serve, args=args, name=f"mh-{index}", daemon=True)
        thread.start()
        self._threads.append(thread)
        while not self.mailboxes.mailboxes[index].ready:  # the loop publishes its block first thing
            threading.Event().wait(0.001)

    def page(self, gpa: int) -> bytes:
        return bytes(self.ram[gpa : gpa + abi.PAGE])

    def generation_of(self, gpa: int) -> int:
        """The anti-replay table entry for ``gpa`` (the MH's private memory; tests look, the VMM cannot)."""
        return int(self._gen[gpa // abi.PAGE])

    def mac_of(self, gpa: int) -> bytes:
        """The MAC table entry for ``gpa`` (MH private memory; zero = never MAC'd)."""
        at = gpa // abi.PAGE * abi.MH_MAC_ENTRY
        return bytes(self._macs[at : at + abi.MH_MAC_ENTRY])

    def vmsa_slot(self, vcpu: int) -> abi.VmsaSlot:
        """VMSA slot ``vcpu`` (MH private memory: tests look, the VMM cannot)."""
        return self._vmsa[vcpu]

    def close(self) -> None:
        for index, thread in enumerate(self._threads):
            self.lib.cp_mh_host_stop(self._idles[index], self.ram_address + self.mailbox_gpa(index))
            thread.join(timeout=5)
        self._threads.clear()
        for ctx in self._ctxs:  # wipe the keys: the contexts are plain host buffers
            ctypes.memset(ctx, 0, len(ctx))

    def __enter__(self) -> HostGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
