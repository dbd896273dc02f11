"""The control channel's security: identities, the trust store, mutual TLS 1.3 (docs/channel.md).

Orchestrator: ``dial(host, port, identity=Identity.load_or_create(home, Role.ORCHESTRATOR), pin=...,
trust=TrustStore.at_home(home))`` (``home = default_home()``). Agent: ``TlsListener(socket.create_server(...),
Identity.load_or_create(home, Role.AGENT), TrustStore.at_home(home))`` and ``accept()`` in its loop.
"""

from confplan.transport.identity import (
    Identity,
    Role,
    default_home,
    fingerprint,
    parse_fingerprint,
    short_fingerprint,
)
from confplan.transport.listener import HANDSHAKE_TIMEOUT, PeerRefused, TlsListener, accept, handshake
from confplan.transport.tls import (
    ACCEPTED,
    CHANNEL_VERSION,
    ChannelError,
    ServerContext,
    UntrustedPeer,
    client_context,
    dial,
    server_context,
)
from confplan.transport.trust import TrustedCert, TrustStore

__all__ = [
    "ACCEPTED",
    "CHANNEL_VERSION",
    "HANDSHAKE_TIMEOUT",
    "ChannelError",
    "Identity",
    "PeerRefused",
    "Role",
    "ServerContext",
    "TlsListener",
    "TrustStore",
    "TrustedCert",
    "UntrustedPeer",
    "accept",
    "client_context",
    "default_home",
    "dial",
    "fingerprint",
    "handshake",
    "parse_fingerprint",
    "server_context",
    "short_fingerprint",
]
