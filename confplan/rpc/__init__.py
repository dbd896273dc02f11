"""The versioned control channel between the orchestrator and a VMM process (or a remote agent).

JSON lines over a stream socket; docs/rpc.md is the contract. ``spawn_child`` starts a local peer on an
inherited socketpair; ``connect_tcp`` reaches a remote one; ``RpcServer`` is the serving side.
"""

from confplan.rpc.client import RpcClient, connect_tcp
from confplan.rpc.protocol import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    MessageTooLarge,
    PeerGone,
    ProtocolError,
    RemoteError,
    RpcError,
    RpcTimeout,
    VersionMismatch,
)
from confplan.rpc.server import Call, RpcServer, serve_fd
from confplan.rpc.spawn import ChildClient, spawn_child

__all__ = [
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "Call",
    "ChildClient",
    "MessageTooLarge",
    "PeerGone",
    "ProtocolError",
    "RemoteError",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "RpcTimeout",
    "VersionMismatch",
    "connect_tcp",
    "serve_fd",
    "spawn_child",
]
