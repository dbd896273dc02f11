"""The control protocol's envelope, limits and errors (docs/rpc.md is the contract).

One JSON object per line (UTF-8, ``\\n``-terminated) over a stream socket:
request ``{"v": 1, "id": n, "method": m, "params": {...}}``, answer ``{"v": 1, "id": n, "result": r}`` or
``{"v": 1, "id": n, "error": {"code": c, "message": s, "hint": h}}``, event ``{"v": 1, "event": e,
"params": {...}}`` (server to client, no answer).
"""

from __future__ import annotations

import json
import socket
from typing import Any, BinaryIO, Final

from confplan.errors import ConfplanError

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE: Final = 1 << 20  # bytes per line, newline excluded; bulk data belongs on the page stream
HELLO: Final = "hello"

# Error codes (strings, stable across versions).
BAD_REQUEST: Final = "bad-request"
TOO_LARGE: Final = "too-large"
UNKNOWN_METHOD: Final = "unknown-method"
VERSION_MISMATCH: Final = "version-mismatch"
NOT_READY: Final = "hello-first"
FAILED: Final = "failed"  # the handler raised a ConfplanError: message and hint are for the user
INTERNAL: Final = "internal"  # the handler raised anything else: a bug in the peer


class RpcError(ConfplanError):
    """A control-channel failure."""


class RemoteError(RpcError):
    """The peer answered a call with an error."""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class PeerGone(RpcError):
    """The peer closed the connection or exited, possibly in the middle of a call."""


class RpcTimeout(RpcError):
    """The peer did not answer in time."""


class ProtocolError(RpcError):
    """The peer broke the protocol: bad JSON, an oversized message, another version."""


class MessageTooLarge(ProtocolError):
    """A message longer than the limit (sent or received)."""


class VersionMismatch(ProtocolError):
    """The two sides speak different protocol versions."""


def version_mismatch(peer: str, theirs: object, ours: int = PROTOCOL_VERSION) -> VersionMismatch:
    return VersionMismatch(
        f"{peer} speaks confplan RPC v{theirs}, this side speaks v{ours}",
        hint="run the same confplan release on both sides (see `confplan --version`)",
    )


def encode(message: dict[str, Any], limit: int) -> bytes:
    """One line; raises ProtocolError when it is longer than ``limit`` bytes."""
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > limit:
        what = message.get("method") or message.get("event") or "answer"
        raise MessageTooLarge(
            f"the RPC message {what!r} is {len(data)} bytes, more than the limit of {limit}",
            hint="send bulk data over the page stream, not the control channel",
        )
    return data + b"\n"


class LineReader:
    """Reads one message per line from a socket, refusing lines longer than ``limit``."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._file: BinaryIO = sock.makefile("rb")
        self.limit = limit

    def read(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream (a truncated last line counts as the end)."""
        line = self._file.readline(self.limit + 1)
        if not line.endswith(b"\n"):
            if len(line) > self.limit:
                raise MessageTooLarge(f"the peer sent a message longer than the limit of {self.limit} bytes")
            return None
        try:
            message = json.loads(line)
        except (ValueError, UnicodeDecodeError) as err:
            raise ProtocolError(f"the peer sent a line that is not JSON: {err}") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"the peer sent a JSON {type(message).__name__}, not an object")
        return message

    def close(self) -> None:
        self._file.close()
