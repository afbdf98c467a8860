"""A trivial HTTP/1.1 server that reads and discards each request body and answers a fixed small
200: the target the load test measures its own load generator's ceiling against.

    python -m loadtest.sink --port 8199 [--processes N] [--mode protocol|threads]

It does as little as a server can, so that the rate a driver reaches against it is what the
driver itself can send: keep-alive, no routing, no JSON, the body counted but never copied into a
request object. Several processes share the port through SO_REUSEPORT (the kernel spreads the
connections), so that one Python core is not the limit. Two implementations, measured against
each other with wrk in the report of issue 10: `protocol` (asyncio.Protocol, uvloop when present;
the default, faster) and `threads` (a blocking socket per connection with recv_into a reused
buffer). The answer names a `probabilities` output, so that a driver's answer check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading

BODY = b'{"model_name":"sink","outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,0]}]}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
MAX_HEADER = 64 * 1024


def _content_length(head: bytes) -> tuple[int, bool]:
    """Body length and whether the client asked to close, from a request's header block."""
    length, close = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return length, close


class SinkProtocol(asyncio.Protocol):
    """A state machine over the byte stream: header block, then `remaining` body bytes to drop.
    Pipelined requests are answered in order, since the loop just carries on over the buffer."""

    def __init__(self) -> None:
        self.head = b""  # a header block split over reads
        self.remaining = -1  # body bytes still to drop; -1: reading a header block
        self.close = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Offsets into `data`, never slices of the body: a 602 KB body is only counted.
        offset = 0
        while offset < len(data):
            if self.remaining >= 0:
                take = min(self.remaining, len(data) - offset)
                offset += take
                self.remaining -= take
                if self.remaining == 0:
                    self._answer()
                continue
            if self.head:  # rare: a header block split between reads
                data, offset = self.head + data[offset:], 0
                self.head = b""
            end = data.find(b"\r\n\r\n", offset)
            if end < 0:
                self.head = data[offset:]
                if len(self.head) > MAX_HEADER and self.transport:
                    self.transport.close()
                return
            length, self.close = _content_length(data[offset:end])
            offset, self.remaining = end + 4, length
            if length == 0:
                self._answer()

    def _answer(self) -> None:
        self.remaining = -1
        if self.transport is not None:
            self.transport.write(RESPONSE)
            if self.close:
                self.transport.close()


def _listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


def serve_protocol(host: str, port: int) -> None:
    try:
        import uvloop  # a faster loop where installed; the sink works without it

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(SinkProtocol, sock=_listener(host, port))
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _serve_connection(conn: socket.socket) -> None:
    # The client may go away mid-request (wrk resets its connections at the end).
    with contextlib.suppress(OSError):
        _serve_requests(conn)


def _serve_requests(conn: socket.socket) -> None:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    pending = b""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            while b"\r\n\r\n" not in pending:
                chunk = conn.recv(65536)
                if not chunk or len(pending) > MAX_HEADER:
                    return
                pending += chunk
            end = pending.find(b"\r\n\r\n")
            length, close = _content_length(pending[:end])
            pending = pending[end + 4 :]
            remaining = length - len(pending)
            pending = pending[length:] if remaining <= 0 else b""
            while remaining > 0:  # the body goes into one reused buffer and is dropped
                got = conn.recv_into(view, min(remaining, len(buffer)))
                if not got:
                    return
                remaining -= got
            conn.sendall(RESPONSE)
            if close:
                return


def serve_threads(host: str, port: int) -> None:
    listener = _listener(host, port)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


MODES = {"protocol": serve_protocol, "threads": serve_threads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sink", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--mode", choices=sorted(MODES), default="protocol")
    args = parser.parse_args(argv)
    serve = MODES[args.mode]
    # Bind once here so that a port in use fails loudly before any child starts.
    _listener(args.host, args.port).close()
    context = multiprocessing.get_context("fork")  # no threads yet: fork is safe and fast
    children = [
        context.Process(target=serve, args=(args.host, args.port), daemon=True)
        for _ in range(max(0, args.processes - 1))
    ]
    for child in children:
        child.start()

    def stop(signum: int, frame: object) -> None:
        for child in children:
            child.terminate()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"sink: {args.processes} {args.mode} process(es) on {args.host}:{args.port}",
          file=sys.stderr, flush=True)  # fmt: skip
    serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
