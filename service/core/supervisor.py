"""The supervisor: `escort serve`'s own process. It binds the listeners, spawns the engine core
process and the HTTP workers, passes signals on, and decides the exit code.

SIGTERM (or Ctrl-C): each worker drains as a single-process server would (readiness false,
503 + Retry-After for new work, requests in flight finished, at most ESCORT_DRAIN_TIMEOUT_S,
then 503 for those left); once every worker has exited the engine process is told to stop,
then the supervisor exits 0. A second signal is passed on too, which brings the workers'
deadline forward to now (what is in flight gets 503, never a reset or a 500); a worker still
alive WORKER_STOP_GRACE_S after the budget is killed (exit code 1). A child that dies
unexpectedly takes the service down with exit code 1 (an orchestrator restarts it); so does a
model that fails to load.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from service.config import Settings
from service.core.engine_process import LOAD_FAILED
from service.dispatch import EngineFactory, default_engine_factory
from service.metrics import MULTIPROC_DIR_VAR

log = logging.getLogger("escort.supervisor")

ENGINE_STOP_TIMEOUT_S = 30.0
POLL_S = 0.5
# A worker still alive this long after the drain's budget ran out (ESCORT_DRAIN_TIMEOUT_S,
# then about a second to write the last answers) is stuck, a blocked event loop say: it is
# killed, so that a stop stays bounded without waiting for the orchestrator's SIGKILL (k8s:
# preStop 5 + drain 30 + this + the engine's stop, within the 45 s grace period).
WORKER_STOP_GRACE_S = 5.0


def bind_listener(host: str, port: int) -> socket.socket:
    """One socket bound to host:port for every worker to accept on."""
    sock = _new_socket(host)
    _bind(sock, host, port)
    sock.set_inheritable(True)
    return sock


def bind_worker_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to the same host:port with SO_REUSEPORT, one per worker: Linux
    hands each new connection to one of them by a hash of its addresses, so connections
    spread evenly instead of in bursts to whichever worker woke first.

    A plain bind first proves the port free: a socket of another server that also set
    SO_REUSEPORT (a second `escort serve` on the same port) would otherwise share it
    silently. With port 0 the kernel picks one port, and every socket takes that port."""
    if sys.platform != "linux":
        raise OSError("ESCORT_LISTENER=per-worker needs Linux (SO_REUSEPORT balancing)")
    port = probe_port(host, port, "ESCORT_PORT")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _new_socket(host)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _bind(sock, host, port)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def probe_port(host: str, port: int, setting: str) -> int:
    """Fail now, with the setting to change, when host:port is taken (by any socket, with
    SO_REUSEPORT or not): the workers bind it themselves later, where a clash would be a
    worker's crash or a silent share. The port bound (the kernel's pick for port 0)."""
    probe = _new_socket(host)
    try:
        probe.bind((host, port))
        return probe.getsockname()[1]
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; set {setting}") from None
    finally:
        probe.close()


def _new_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def _bind(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}; set ESCORT_PORT") from None


class Supervisor:
    def __init__(self, settings: Settings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.signals = 0
        self.exit_code = 0
        self.stop_by: float | None = None  # time.monotonic(): workers alive then are killed

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        self._set_stop_by()
        log.info("signal %d: %s", sig, "draining" if self.signals == 1 else "stopping now")
        for worker in self.workers:
            if worker.is_alive() and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def run(self) -> int:
        settings = self.settings
        count = settings.worker_processes
        if settings.grpc:
            probe_port(settings.host, settings.grpc_port, "ESCORT_GRPC_PORT")
        if settings.per_worker_listeners:
            listeners = bind_worker_listeners(settings.host, settings.port, count)
        else:
            listeners = [bind_listener(settings.host, settings.port)] * count
        ctx = mp.get_context("spawn")
        control, control_child = ctx.Pipe()
        pipes = [ctx.Pipe() for _ in range(count)]
        self.engine = ctx.Process(
            target=_engine_main,
            args=(settings, control_child, [engine_end for _, engine_end in pipes]),
            kwargs={"engine_factory": self.engine_factory},
            name="escort-engine",
        )
        self.workers: list[BaseProcess] = [
            ctx.Process(
                target=_worker_main,
                args=(settings, listener, worker_end, i),
                name=f"escort-worker-{i}",
            )
            for i, ((worker_end, _), listener) in enumerate(zip(pipes, listeners, strict=True))
        ]
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.engine.start()
            for worker in self.workers:
                worker.start()
            # Our copies of the children's ends: closed, so a child's death reads as EOF.
            control_child.close()
            for worker_end, engine_end in pipes:
                worker_end.close()
                engine_end.close()
            for listener in set(listeners):
                listener.close()
            log.info(
                "serving on http://%s:%d with %d HTTP worker(s) (%s listener) and one engine "
                "process",
                settings.host,
                settings.port,
                count,
                "per-worker" if settings.per_worker_listeners else "shared",
            )
            self._watch()
            self._stop_engine(control)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for process in (*self.workers, self.engine):
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return self.exit_code

    def _watch(self) -> None:
        """Until every worker has exited: note unexpected deaths and take the rest down."""
        alive = {w.sentinel: w for w in self.workers}
        engine_sentinel = self.engine.sentinel
        while alive:
            self._kill_stuck(list(alive.values()))
            ready = wait([*alive, engine_sentinel], timeout=POLL_S)
            for sentinel in ready:
                if sentinel == engine_sentinel:
                    self.engine.join(5)
                    if self.engine.exitcode == LOAD_FAILED:
                        log.info("stopping: the models did not load")
                        self.exit_code = 1
                    elif self.engine.exitcode != 0 or not self.signals:
                        log.error("the engine process exited (code %s)", self.engine.exitcode)
                        self.exit_code = 1
                    engine_sentinel = None
                    self._terminate_workers()
                    continue
                worker = alive.pop(sentinel)
                worker.join(5)  # the sentinel can fire a moment before the exit status is in
                _mark_dead(worker.pid)
                if worker.exitcode != 0 or not self.signals:
                    if self.exit_code == 0:
                        log.error("%s exited (code %s)", worker.name, worker.exitcode)
                    self.exit_code = 1
                    self._terminate_workers()
            if engine_sentinel is None:
                # The engine is gone: wait for the workers without watching it again.
                self._kill_stuck(list(alive.values()))
                for sentinel in wait(list(alive), timeout=POLL_S):
                    _mark_dead(alive.pop(sentinel).pid)

    def _set_stop_by(self) -> None:
        if self.stop_by is None:
            self.stop_by = time.monotonic() + self.settings.drain_timeout_s + WORKER_STOP_GRACE_S

    def _kill_stuck(self, alive: list[BaseProcess]) -> None:
        """Past `stop_by`: kill the workers that are still alive (their exit reads as a crash,
        so the exit code is 1)."""
        if self.stop_by is None or time.monotonic() < self.stop_by:
            return
        for worker in alive:
            if worker.is_alive():
                log.error(
                    "%s did not stop within ESCORT_DRAIN_TIMEOUT_S + %.0f s; killed",
                    worker.name, WORKER_STOP_GRACE_S,
                )  # fmt: skip
                worker.kill()
                self.exit_code = 1

    def _terminate_workers(self) -> None:
        self._set_stop_by()
        if self.signals == 0:
            self.signals = 1  # what follows is a shutdown, not a crash of the survivors
            for worker in self.workers:
                if worker.is_alive() and worker.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGTERM)

    def _stop_engine(self, control) -> None:
        if self.engine.is_alive():
            with contextlib.suppress(OSError):
                control.send(("stop",))
            self.engine.join(ENGINE_STOP_TIMEOUT_S)
        if self.engine.is_alive():
            log.error("the engine process did not stop in %.0f s", ENGINE_STOP_TIMEOUT_S)
            self.engine.kill()
            self.exit_code = 1
        elif self.engine.exitcode not in (0, None, LOAD_FAILED):
            self.exit_code = 1
        _mark_dead(self.engine.pid)


def _mark_dead(pid: int | None) -> None:
    if pid is None or not os.environ.get(MULTIPROC_DIR_VAR):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def _engine_main(settings, control, conns, engine_factory) -> None:
    from service.core import engine_process

    engine_process.main(settings, control, conns, engine_factory)


def _worker_main(settings, sock, conn, index) -> None:
    from service.core import worker

    worker.main(settings, sock, conn, index)


def run_service(settings: Settings, engine_factory: EngineFactory = default_engine_factory) -> int:
    """Serve with the supervisor layout until told to stop; the process's exit code."""
    from service.core.preflight import startup_problems

    # Before the port is bound: a bad manifest is a failed start, not a server that dies.
    problems = startup_problems(settings, check_models=engine_factory is default_engine_factory)
    if problems:
        for problem in problems:
            log.error("%s", problem)
        log.error(
            "not started: %d of %d models cannot be served", len(problems), len(settings.models)
        )
        return 1
    # Before any child imports prometheus_client: the children's metrics go to files there,
    # and a scrape of any worker adds them up. A fresh folder per run (stale files would add
    # a previous run's counts).
    folder = tempfile.mkdtemp(prefix="escort-metrics-")
    os.environ[MULTIPROC_DIR_VAR] = folder
    started = time.monotonic()
    try:
        return Supervisor(settings, engine_factory).run()
    except OSError as exc:
        log.error("%s", exc)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("stopped after %.0f s", time.monotonic() - started)
