"""Where the Locust users run: in this process, or spread over worker processes.

One gevent process tops out at roughly one CPU core of HTTP work, which a GPU server outruns,
so `LOADTEST_PROCESSES=N` starts N Locust workers (`python -m loadtest.worker`) under a master
in this process. Both drivers offer the same steps to the runner: set the plan, spawn users,
open a measured step, close it and collect its samples.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import astuple, replace
from typing import Any

import gevent
from locust import events
from locust.env import Environment

from loadtest import locustfile
from loadtest.config import LoadtestConfig

MAX_SPAWN_RATE = 100.0  # Locust warns above this, per process
PLAN_MESSAGE = "escort_plan"
CLOSE_MESSAGE = "escort_close"
SAMPLES_MESSAGE = "escort_samples"


def user_classes(config: LoadtestConfig) -> list[type]:
    by_protocol = {
        locustfile.V1: locustfile.V1MultipartUser,
        locustfile.V2: locustfile.V2BinaryUser,
    }
    return [by_protocol[p] for p in config.protocols]


def environment(config: LoadtestConfig) -> Environment:
    # Users finish the request they are in when a step lowers their number, so that every
    # request sent is answered and recorded.
    return Environment(
        user_classes=user_classes(config),
        host=config.urls[0],
        events=events,
        stop_timeout=config.timeout_s + 1.0,
    )


def spawn_rate(users: int, processes: int = 1) -> float:
    return min(MAX_SPAWN_RATE * processes, max(1.0, users * 4.0))


class LocalDriver:
    """Every user in this process; samples go straight into the plan."""

    processes = 1

    def __init__(self, plan: locustfile.LoadPlan) -> None:
        self.plan = plan
        self.runner = environment(plan.config).create_local_runner()
        self._first = 0

    def prepare(self, budget: int, fixed_backend: str | None) -> None:
        self.plan.step, self.plan.budget, self.plan.fixed_backend = -1, budget, fixed_backend

    def retarget(self, urls: tuple[str, ...]) -> None:
        """Send to other servers (the ceilings' sink or null engine) until retargeted back."""
        self.plan.config = replace(self.plan.config, urls=urls)

    def spawn(self, users: int, timeout_s: float) -> None:
        self.runner.start(users, spawn_rate=spawn_rate(users))
        if self.runner.spawning_greenlet is not None:
            self.runner.spawning_greenlet.join(timeout=timeout_s)

    def open(self, step: int) -> None:
        self._first = len(self.plan.samples)
        self.plan.step = step

    def finished(self) -> bool:
        """The step's request budget is spent and every answer is in."""
        return self.plan.budget <= 0 and self.plan.inflight == 0

    def close(self, step: int) -> list[locustfile.Sample]:
        self.plan.step = -1
        return [s for s in self.plan.samples[self._first :] if s.step == step]

    def quit(self) -> None:
        self.runner.quit()

    def exceptions(self) -> list[dict[str, Any]]:
        return [{"count": e["count"], "msg": e["msg"]} for e in self.runner.exceptions.values()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DistributedDriver:
    """A Locust master here and `processes` workers on this machine, talking over loopback.

    The plan travels to the workers as custom messages; on close, each worker answers with the
    samples of the step it recorded, and the master waits for all of them."""

    def __init__(self, plan: locustfile.LoadPlan, processes: int) -> None:
        self.plan = plan
        self.processes = processes
        port = _free_port()
        self.runner = environment(plan.config).create_master_runner(
            master_bind_host="127.0.0.1", master_bind_port=port
        )
        self._seq = 0
        self._replies: dict[int, list[list[Any]]] = {}
        self.missing_replies = 0
        self.runner.register_message(SAMPLES_MESSAGE, self._on_samples)
        command = [sys.executable, "-m", "loadtest.worker", str(port)]
        self.workers = [subprocess.Popen(command, env=os.environ.copy()) for _ in range(processes)]
        deadline = time.monotonic() + 120
        while len(self.runner.clients.ready) < processes:
            if any(w.poll() is not None for w in self.workers):
                self.quit()
                raise RuntimeError("a load test worker process exited while starting")
            if time.monotonic() > deadline:
                self.quit()
                raise RuntimeError(f"only {len(self.runner.clients.ready)} of {processes} "
                                   "load test workers connected")  # fmt: skip
            gevent.sleep(0.1)

    def _on_samples(self, environment: Any, msg: Any, **kwargs: Any) -> None:
        self._replies.setdefault(msg.data["seq"], []).append(msg.data["rows"])

    def _send(self, kind: str, **data: Any) -> int:
        self._seq += 1
        self.runner.send_message(kind, {"seq": self._seq, **data})
        return self._seq

    def prepare(self, budget: int, fixed_backend: str | None) -> None:
        share = math.ceil(budget / self.processes)
        self._send(PLAN_MESSAGE, step=-1, budget=share, fixed_backend=fixed_backend)

    def retarget(self, urls: tuple[str, ...]) -> None:
        self.plan.config = replace(self.plan.config, urls=urls)
        self._send(PLAN_MESSAGE, step=-1, urls=list(urls))

    def spawn(self, users: int, timeout_s: float) -> None:
        self.runner.start(users, spawn_rate=spawn_rate(users, self.processes))
        deadline = time.monotonic() + timeout_s
        # Set once every worker has reported its share spawned.
        while not self.runner.spawning_completed and time.monotonic() < deadline:
            gevent.sleep(0.05)

    def open(self, step: int) -> None:
        self._send(PLAN_MESSAGE, step=step)

    def finished(self) -> bool:
        return False  # budgets are per worker; the step ends on time

    def close(self, step: int) -> list[locustfile.Sample]:
        seq = self._send(CLOSE_MESSAGE, step=step)
        deadline = time.monotonic() + 15
        while len(self._replies.get(seq, [])) < self.processes and time.monotonic() < deadline:
            gevent.sleep(0.02)
        replies = self._replies.pop(seq, [])
        self.missing_replies += self.processes - len(replies)
        return [locustfile.Sample(*row) for rows in replies for row in rows]

    def quit(self) -> None:
        self.runner.quit()
        for worker in self.workers:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.terminate()
                worker.wait(timeout=10)

    def exceptions(self) -> list[dict[str, Any]]:
        found = [{"count": e["count"], "msg": e["msg"]} for e in self.runner.exceptions.values()]
        if self.missing_replies:
            found.append({"count": self.missing_replies, "msg": "worker replies missing"})
        return found


def worker_handlers(runner: Any, plan: locustfile.LoadPlan) -> None:
    """Install, in a worker process, the handlers of the master's plan messages."""

    def on_plan(environment: Any, msg: Any, **kwargs: Any) -> None:
        data = msg.data
        if "budget" in data:
            plan.budget = data["budget"]
        if "fixed_backend" in data:
            plan.fixed_backend = data["fixed_backend"]
        if "urls" in data:
            plan.config = replace(plan.config, urls=tuple(data["urls"]))
        plan.step = data["step"]

    def on_close(environment: Any, msg: Any, **kwargs: Any) -> None:
        plan.step = -1
        rows = [list(astuple(s)) for s in plan.samples if s.step == msg.data["step"]]
        plan.samples.clear()
        runner.send_message(SAMPLES_MESSAGE, {"seq": msg.data["seq"], "rows": rows})

    runner.register_message(PLAN_MESSAGE, on_plan)
    runner.register_message(CLOSE_MESSAGE, on_close)
