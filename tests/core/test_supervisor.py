"""The supervisor's listeners: one shared socket, or one SO_REUSEPORT socket per worker."""

from __future__ import annotations

import socket
import sys

import pytest

from service.config import Settings
from service.core.supervisor import bind_listener, bind_worker_listeners

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing")


def _port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


@linux_only
def test_per_worker_listeners_share_one_port_picked_once() -> None:
    sockets = bind_worker_listeners("127.0.0.1", 0, 4)
    try:
        assert len(sockets) == 4
        assert len({_port(s) for s in sockets}) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets)
        assert all(s.get_inheritable() for s in sockets)
        # Each one accepts on its own: connect until every socket has taken a connection.
        for s in sockets:
            s.listen(64)
            s.setblocking(False)
        port = _port(sockets[0])
        clients, accepted = [], [0] * 4
        for _ in range(200):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            for i, s in enumerate(sockets):
                try:
                    s.accept()[0].close()
                    accepted[i] += 1
                except BlockingIOError:
                    pass
            if all(accepted):
                break
        for c in clients:
            c.close()
        assert all(accepted), accepted
    finally:
        for s in sockets:
            s.close()


@linux_only
@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_held_by_another_server_is_refused(reuse_port: bool) -> None:
    # A second `escort serve` on the same port sets SO_REUSEPORT too: it must not join the
    # first one's group silently.
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    try:
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1.*set ESCORT_PORT"):
            bind_worker_listeners("127.0.0.1", _port(other), 2)
        with pytest.raises(OSError, match="set ESCORT_PORT"):
            bind_listener("127.0.0.1", _port(other))
    finally:
        other.close()


def test_the_shared_listener_is_one_inheritable_socket() -> None:
    sock = bind_listener("127.0.0.1", 0)
    try:
        assert sock.get_inheritable() and _port(sock) > 0
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("listener", "platform", "per_worker"),
    [
        ("auto", "linux", True),
        ("auto", "darwin", False),
        ("shared", "linux", False),
        ("per-worker", "linux", True),
    ],
)
def test_the_listener_setting_resolves_per_platform(
    monkeypatch: pytest.MonkeyPatch, listener: str, platform: str, per_worker: bool
) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert Settings(listener=listener).per_worker_listeners is per_worker


def test_per_worker_listeners_elsewhere_say_they_need_linux(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(OSError, match="needs Linux"):
        bind_worker_listeners("127.0.0.1", 0, 2)
