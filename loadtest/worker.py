"""A Locust worker process of the distributed load test (started by loadtest.drivers with the
master's port as its one argument; its settings come from the same LOADTEST_* variables)."""

from __future__ import annotations

import os
import sys

from loadtest import locustfile
from loadtest.config import load_config
from loadtest.drivers import environment, worker_handlers


def main(argv: list[str]) -> int:
    port = int(argv[0])
    config = load_config()
    plan = locustfile.build_plan(config)
    locustfile.PLAN = plan
    runner = environment(config).create_worker_runner("127.0.0.1", port)
    worker_handlers(runner, plan)
    runner.greenlet.join()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The master said quit and has every sample; skip interpreter teardown, where the zmq
    # context can linger for many seconds on a socket the master already closed.
    os._exit(code)
