"""A tiny RPC server for testing the control channel between real processes (not part of a migration).

``python -m confplan.rpc.selftest --control-fd N`` serves the inherited socket N (as ``spawn_child``
starts it); ``--listen HOST:PORT`` serves TCP and prints ``listening PORT`` once ready. ``--speak V``
answers as protocol version V, to test the version check.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

from confplan.errors import ConfplanError
from confplan.rpc.protocol import PROTOCOL_VERSION
from confplan.rpc.server import Call, RpcServer, serve_fd


def build_server(version: int = PROTOCOL_VERSION) -> RpcServer:
    server = RpcServer("the selftest server", version=version)

    @server.method("echo")
    def echo(params: dict[str, Any], call: Call) -> Any:
        return {"params": params, "pid": os.getpid()}

    @server.method("count")
    def count(params: dict[str, Any], call: Call) -> int:
        total = int(params.get("n", 3))
        for done in range(1, total + 1):
            call.notify("progress", {"done": done, "total": total})
        return total

    @server.method("fail")
    def fail(params: dict[str, Any], call: Call) -> None:
        raise ConfplanError(str(params.get("message", "refused")), hint=params.get("hint"))

    @server.method("bug")
    def bug(params: dict[str, Any], call: Call) -> None:
        raise ValueError("a bug in the handler")

    @server.method("sleep")
    def sleep(params: dict[str, Any], call: Call) -> float:
        seconds = float(params.get("seconds", 1.0))
        call.notify("sleeping", {"seconds": seconds})
        time.sleep(seconds)
        return seconds

    @server.method("crash")
    def crash(params: dict[str, Any], call: Call) -> None:
        print(f"selftest: crashing on purpose with code {params.get('code', 3)}", file=sys.stderr, flush=True)
        os._exit(int(params.get("code", 3)))

    @server.method("big")
    def big(params: dict[str, Any], call: Call) -> str:
        return "x" * int(params.get("size", 0))

    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m confplan.rpc.selftest")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--control-fd", type=int, help="serve this inherited socket fd")
    where.add_argument("--listen", help="serve TCP on HOST:PORT (port 0: any free port)")
    parser.add_argument("--speak", type=int, default=PROTOCOL_VERSION, help="protocol version to answer as")
    args = parser.parse_args(argv)
    server = build_server(args.speak)
    if args.control_fd is not None:
        serve_fd(server, args.control_fd)
        return 0
    host, _, port = args.listen.rpartition(":")
    listener = socket.create_server((host, int(port)))
    print(f"listening {listener.getsockname()[1]}", flush=True)
    server.serve_tcp(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main())
