"""Trust anchors: AMD's public ARKs and ASKs built in, pinned by SHA-256, and the one rule for roots.

The rule (``check_root``): a chain is trusted if its ARK is one of AMD's built-in ARKs (for SEV the
``AMD_CERT`` bytes, for SNP the X.509 DER; by default nothing else), or one the owner pinned
(``pins``: SHA-256 of the ARK as received), narrowing the choice. An ARK that is not AMD's (the emulated
secure processor's) passes only if the owner said ``trust_emulated`` and, with pins, pinned it. The data
files and their source are in ``amd_anchors/README.md``; a file whose hash is not the one below is refused.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from functools import cache
from importlib import resources

from cryptography import x509

from confplan.sev.amd_cert import AmdCaChain, AmdCert
from confplan.sev.signing import VerifyError

SEV_PRODUCTS = ("naples", "rome", "milan", "genoa", "turin")
SNP_PRODUCTS = ("milan", "genoa", "turin")

# SHA-256 of each file as AMD's KDS serves it (see amd_anchors/README.md).
SEV_PINS: dict[str, tuple[str, str]] = {  # product: (ARK, ASK), AMD_CERT bytes
    "naples": (
        "dedabca561e1dece8cc00b7bda864cf5f20b95017864408cfe18eaee0dce24b9",
        "c6f30cf923f526c3bcd5c8c221db51e0db65911782f046de17a6603131cdfd7f",
    ),
    "rome": (
        "865977b268c16d5b27772b00aaefb4e737ba9499e818ed8e9f65b0cecefbc529",
        "7754a69407d25540fe3a695be6b02c58a53bffd12594f5c30793d6cb62875706",
    ),
    "milan": (
        "1246469862b78a7a8625579b0378d1f8e975eb8b82a1623b579d7968a5969888",
        "c7c73765561c58003a3d09adb2c76993027dd3a1ec4e9be876024c035e015cec",
    ),
    "genoa": (
        "8f4e3fd36589c23f1fe0c8338465bac7e2e066d97fc92f228bbee4fd356fb674",
        "c30307e4f594fb6c51fd753ab758eb78ad4bb70d9e4d96690e51c0621901031d",
    ),
    "turin": (
        "f6405e5096a6eee1eb7d5df75c49f9b9f7c8357a31c7fff150149d68588a7bf7",
        "2ee285477f0d5eb94a69029197f4cf58ca82d8e1b9a276da1ac45b0db3f4be56",
    ),
}
SNP_PINS: dict[str, tuple[str, str]] = {  # product: (ARK, ASK), X.509 DER
    "milan": (
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    ),
    "genoa": (
        "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    ),
    "turin": (
        "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    ),
}


def _data(name: str) -> bytes:
    return resources.files("confplan.sev").joinpath("amd_anchors", name).read_bytes()


def _pinned(name: str, raw: bytes, pin: str) -> bytes:
    if hashlib.sha256(raw).hexdigest() != pin:
        raise VerifyError(
            f"built-in anchor {name} has SHA-256 {hashlib.sha256(raw).hexdigest()}, pinned {pin}",
            field="anchor",
            hint="the installed confplan package was altered; reinstall it",
        )
    return raw


@cache
def sev_ca(product: str) -> AmdCaChain:
    """AMD's ARK and ASK (``AMD_CERT``) for ``product`` (naples, rome, milan, genoa, turin)."""
    ark_pin, ask_pin = SEV_PINS[product]
    ark = AmdCert.parse(_pinned(f"{product}_ark.cert", _data(f"{product}_ark.cert"), ark_pin), "ARK")
    ask = AmdCert.parse(_pinned(f"{product}_ask.cert", _data(f"{product}_ask.cert"), ask_pin), "ASK")
    return AmdCaChain(ask, ark)


def load_x509(raw: bytes, what: str) -> x509.Certificate:
    """A certificate from PEM or DER. AMD's VCEKs carry a zero serial, which cryptography warns about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if raw.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(raw)
            return x509.load_der_x509_certificate(raw)
        except ValueError as err:
            raise VerifyError(f"{what}: not an X.509 certificate (PEM or DER): {err}", field="der") from None


def der_fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@cache
def snp_ca(product: str) -> tuple[x509.Certificate, x509.Certificate]:
    """AMD's SNP ARK and ASK (X.509) for ``product`` (milan, genoa, turin)."""
    certs = []
    for kind, pin in zip(("ark", "ask"), SNP_PINS[product], strict=True):
        cert = load_x509(_data(f"{product}_{kind}.pem"), f"built-in {product} {kind.upper()}")
        if der_fingerprint(cert) != pin:
            raise VerifyError(f"built-in anchor {product}_{kind}.pem is not the pinned one", field="anchor")
        certs.append(cert)
    return certs[0], certs[1]


def sev_ark_product(fingerprint: str) -> str | None:
    """Which AMD product line an SEV ARK (SHA-256 of its ``AMD_CERT`` bytes) is, or None."""
    return next((p for p, (ark, _) in SEV_PINS.items() if ark == fingerprint), None)


def snp_ark_product(fingerprint: str) -> str | None:
    """Which AMD product line an SNP ARK (SHA-256 of its DER) is, or None."""
    return next((p for p, (ark, _) in SNP_PINS.items() if ark == fingerprint), None)


@dataclass(frozen=True)
class RootVerdict:
    """Why a chain's root is trusted: an AMD product line, or the explicitly trusted emulated platform."""

    fingerprint: str
    product: str | None  # None: the emulated platform

    @property
    def emulated(self) -> bool:
        return self.product is None

    def describe(self) -> str:
        if self.product is None:
            return f"EMULATED platform ARK {self.fingerprint[:16]}... (trusted by explicit choice)"
        return f"AMD {self.product.capitalize()} ARK {self.fingerprint[:16]}... (built-in)"


def check_root(
    fingerprint: str, amd_product: str | None, *, pins: list[str], trust_emulated: bool, where: str = ""
) -> RootVerdict:
    """The trust rule of the module docstring for an ARK with this SHA-256; ``amd_product`` is the AMD
    product line it is (None: not an AMD ARK). Raises ``VerifyError`` (field ``ark``) naming why not."""
    at = f" of {where}" if where else ""
    if pins and fingerprint not in pins:
        raise VerifyError(
            f"platform ARK {fingerprint} is not in trusted_ark_sha256{at}",
            field="ark",
            hint="this platform's root of trust is not one the owner pinned",
        )
    if amd_product is not None:
        return RootVerdict(fingerprint, amd_product)
    if not trust_emulated:
        raise VerifyError(
            f"platform ARK {fingerprint} is not one of AMD's built-in ARKs (Naples .. Turin): a host can "
            "make up such a chain",
            field="ark",
            hint="only for confplan's EMULATED secure processor: trust it explicitly "
            "(trust_emulated_platform / --trust-emulated-platform)",
        )
    return RootVerdict(fingerprint, None)
