"""Headless load test: `python -m loadtest.run` (what `make loadtest` runs).

It waits for the server to be ready, then ramps concurrency over the LOADTEST_USERS steps. Each
step spawns its users, lets them settle, scrapes /metrics, measures for the rest of its share of
LOADTEST_DURATION_S (or until its share of LOADTEST_MAX_REQUESTS is spent), and scrapes again.
In compare mode (LOADTEST_COMPARE=1) the whole ramp runs once per backend. LOADTEST_DRIVER picks
the load generator: Locust users (default) or wrk (loadtest/wrksteps.py). Before the ramp, the
ceilings are measured with the same driver: against loadtest.sink (LOADTEST_SINK=1) and a null
engine server (LOADTEST_CEILING_URL). The report (JSON, markdown, PNG plots) goes to LOADTEST_OUT.
Only loopback targets are accepted.

Exit status: 0 when requests were answered, 1 when none was (or the load generator failed), 2
for bad settings (including a model or backend the server does not have), 3 when the server
never became ready.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import gevent

from loadtest import locustfile
from loadtest.ceilings import Sink, ceiling_entry, ceilings_section
from loadtest.ceilings import wait_ready as wait_ceiling
from loadtest.config import (
    LoadtestConfig,
    LoadtestConfigError,
    load_config,
    unknown_setting_warnings,
)
from loadtest.drivers import DistributedDriver, LocalDriver
from loadtest.envelope import batch_delay_ms, envelope_section
from loadtest.layerbench import fuller, layer_bench_section, load_records
from loadtest.promtext import Scrape, delta, delta_all, scrape_all
from loadtest.report import (
    build_report,
    side_by_side_markdown,
    step_summary,
    traffic_stats,
    write_report,
)
from loadtest.stages import cores_busy
from loadtest.summary import conclusion, empty_step_reason
from loadtest.wrk import WrkMissing, find_wrk
from loadtest.wrksteps import WrkDriver, generator_cores, wrk_step_summary, wrk_traffic

POLL_S = 0.05
CEILING_STEP = 1_000_000  # the step number a ceiling's samples are recorded under
Driver = LocalDriver | DistributedDriver


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ready_problem(url: str) -> str | None:
    """None when `url` answers 200 on /v2/health/ready, else what it said."""
    ready = url + "/v2/health/ready"
    try:
        with urllib.request.urlopen(ready, timeout=5) as response:  # noqa: S310 - loopback only
            return None if response.status == 200 else f"{ready} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{ready} answered {exc.code}"
    except OSError as exc:
        return f"{ready}: {exc}"


def wait_ready(config: LoadtestConfig) -> str | None:
    """None once every target answers 200 on /v2/health/ready, else why it did not."""
    deadline = time.monotonic() + config.ready_timeout_s
    pending = list(config.urls)
    last = "no answer yet"
    while pending:
        problem = ready_problem(pending[0])
        if problem is None:
            pending.pop(0)
            continue
        last = problem
        if time.monotonic() >= deadline:
            return f"not ready after {config.ready_timeout_s:.0f} s ({last})"
        gevent.sleep(0.5)
    return None


def _scrape(config: LoadtestConfig) -> list[Scrape]:
    return scrape_all(config.scrape_urls, timeout_s=10.0, api_key=config.api_key)


def run_step(
    driver: Driver, config: LoadtestConfig, index: int, users: int, step_s: float, settle_s: float
) -> tuple[float, list[locustfile.Sample], list[Scrape], list[Scrape], int | None]:
    """Ramp to `users`, settle, then measure; returns the measured window, its samples, the
    scrapes that bracket it, and the requests in flight as it closed (None: not known)."""
    step_start = time.monotonic()
    driver.spawn(users, timeout_s=max(1.0, step_s))
    gevent.sleep(max(0.0, settle_s - (time.monotonic() - step_start)))
    before = _scrape(config)
    driver.open(index)
    window_start = time.monotonic()
    deadline = step_start + step_s
    while time.monotonic() < deadline and not driver.finished():
        gevent.sleep(POLL_S)
    window_s = time.monotonic() - window_start
    # Only this process's users are counted; workers' (LOADTEST_PROCESSES > 1) are not.
    inflight = driver.plan.inflight if isinstance(driver, LocalDriver) else None
    samples = driver.close(index)
    after = _scrape(config)
    return window_s, samples, before, after, inflight


def locust_rate(
    driver: Driver, config: LoadtestConfig, url: str, users: int, step_s: float, settle_s: float
) -> dict[str, Any]:
    """One unbudgeted Locust step against `url` (a ceiling), then back to the real targets."""
    driver.retarget((url,))
    driver.prepare(10**9, None)
    try:
        driver.spawn(users, timeout_s=max(1.0, step_s))
        gevent.sleep(settle_s)
        driver.open(CEILING_STEP)
        window_start = time.monotonic()
        gevent.sleep(max(1.0, step_s - settle_s))
        window_s = time.monotonic() - window_start
        samples = driver.close(CEILING_STEP)
    finally:
        driver.retarget(config.urls)
    return {**traffic_stats(samples, window_s), "window_s": window_s}


def wrk_rate(
    driver: WrkDriver,
    url: str,
    users: int,
    step_s: float,
    settle_s: float,
    phase: str | None,
    scraped: bool = False,
    api_key: str = "",
) -> dict[str, Any]:
    """One wrk run against `url` (a ceiling); with `scraped`, also which of its processes were
    busy, from its /metrics before and after."""
    specs = driver.specs(phase)
    if settle_s >= 0.5:
        driver.measure((url,), specs, users, settle_s)

    def scrape() -> Scrape:
        return scrape_all((url + "/metrics",), timeout_s=10.0, api_key=api_key)[0]

    before = scrape() if scraped else {}
    result = driver.measure((url,), specs, users, max(1.0, step_s - settle_s))
    traffic = {**wrk_traffic(result, specs[0].images), "window_s": result["duration_s"]}
    traffic["generator_cores"] = generator_cores(result)
    if scraped:
        traffic["server_cores"] = cores_busy(delta(before, scrape()), result["duration_s"])
    return traffic


def measure_ceilings(
    driver: Driver | WrkDriver,
    config: LoadtestConfig,
    phase: str | None,
    step_s: float,
    settle_s: float,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The load generator's rate against the sink (LOADTEST_SINK) and the HTTP layer's against
    the null engine (LOADTEST_CEILING_URL), each at the largest step's concurrency."""
    users = max(config.users)

    def rate(url: str, scraped: bool = False) -> dict[str, Any]:
        if isinstance(driver, WrkDriver):
            return wrk_rate(driver, url, users, step_s, settle_s, phase, scraped, config.api_key)
        return locust_rate(driver, config, url, users, step_s, settle_s)

    generator = http = None
    if config.sink:
        with Sink() as sink:
            generator = ceiling_entry("sink", sink.url, users, rate(sink.url))
        log(f"  ceiling: load generator {generator['rps']:.0f} req/s against the sink")
    if config.ceiling_url:
        wait_ceiling(config.ceiling_url, config.ready_timeout_s)
        traffic = rate(config.ceiling_url, scraped=True)
        http = ceiling_entry("null engine", config.ceiling_url, users, traffic)
        log(f"  ceiling: HTTP layer {http['rps']:.0f} req/s against {config.ceiling_url}")
    return generator, http


def make_driver(config: LoadtestConfig, plan: locustfile.LoadPlan) -> Driver | WrkDriver:
    if config.driver == "wrk":
        return WrkDriver(plan, find_wrk(config.wrk))
    return DistributedDriver(plan, config.processes) if config.processes > 1 else LocalDriver(plan)


def run(config: LoadtestConfig) -> int:
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    wall_start = time.monotonic()
    problem = wait_ready(config)
    if problem:
        log(f"loadtest: the server is {problem}")
        return 3
    try:
        plan = locustfile.build_plan(config)
        layer_records = load_records(config.layer_bench) if config.layer_bench else None
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        log(f"loadtest: cannot plan the run: {exc}")
        return 2
    locustfile.PLAN = plan
    mode = "compare" if config.compare and len(plan.backends) > 1 else "mixed"
    phases: list[str | None] = list(plan.backends) if mode == "compare" else [None]
    total_steps = len(phases) * len(config.users)
    step_s = config.duration_s / total_steps
    settle_s = min(config.settle_s, step_s * 0.25)
    budget = max(1, config.max_requests // total_steps)
    log(
        f"loadtest: {plan.model} at {', '.join(config.urls)} with {config.driver}; {mode} over "
        f"{plan.backends or ['(server default)']}; {total_steps} steps of {step_s:.1f} s "
        f"(first {settle_s:.1f} s not measured), at most {budget} requests each"
    )
    try:
        driver = make_driver(config, plan)
    except WrkMissing as exc:
        log(f"loadtest: {exc}")
        return 2
    except RuntimeError as exc:
        log(f"loadtest: {exc}")
        return 1
    steps: list[dict[str, Any]] = []
    first_scrape: list[Scrape] | None = None
    last_scrape: list[Scrape] = []
    # Per phase, the step whose batches were fullest (its summary and delta): its sampled
    # layers ran at the batch nearest the offline benchmark's.
    fullest: dict[str, tuple[dict[str, Any], Scrape]] = {}
    measured: list[tuple[dict[str, Any], Scrape]] = []  # every step, for the per-layer summary
    try:
        ceilings = measure_ceilings(driver, config, phases[0], step_s, settle_s)
        for phase in phases:
            for position, users in enumerate(config.users):
                index, name = len(steps), phase or "mixed"
                think_ms = config.think_for(position)
                inflight = None
                if isinstance(driver, WrkDriver):
                    specs = driver.specs(phase)
                    result, before, after, during = driver.step(
                        specs, users, step_s, settle_s, budget, lambda: _scrape(config), think_ms
                    )
                    delta = delta_all(before, after)
                    held = delta_all([{} for _ in during], during) if during else None
                    summary = wrk_step_summary(
                        index, name, users, result, delta, plan.model, specs, held
                    )
                else:
                    driver.prepare(budget, phase)
                    window_s, samples, before, after, inflight = run_step(
                        driver, config, index, users, step_s, settle_s
                    )
                    delta = delta_all(before, after)
                    summary = step_summary(index, name, users, window_s, samples, delta, plan.model)
                summary["think_ms"] = think_ms
                first_scrape = before if first_scrape is None else first_scrape
                last_scrape = after
                steps.append(summary)
                if fuller(summary, fullest.get(name)):
                    fullest[name] = (summary, delta)
                if layer_records is not None:
                    measured.append((summary, delta))
                lat = summary["latency_ms"]
                log(
                    f"  step {index + 1}/{total_steps} {name} users={users}"
                    f"{f' think={think_ms} ms' if think_ms else ''}: "
                    f"{summary['requests']} requests, {summary['images_per_s']:.1f} img/s, "
                    f"p50 {lat['p50'] or 0:.1f} ms, p99 {lat['p99'] or 0:.1f} ms, "
                    f"errors {summary['errors'] or 'none'}"
                )
                if summary["ok"] == 0:  # say why, here and in the report
                    not_ready = next(filter(None, map(ready_problem, config.urls)), None)
                    summary["empty_reason"] = empty_step_reason(summary, inflight, not_ready)
                    log(f"    no correct answer: {summary['empty_reason']}")
    except (RuntimeError, OSError) as exc:  # wrk failed, or the sink or null server did
        log(f"loadtest: {exc}")
        return 1
    finally:
        driver.quit()

    run_delta = delta_all(first_scrape or [], last_scrape) if first_scrape else {}
    report = build_report(
        config.public(),
        plan.model,
        plan.card,
        mode,
        plan.backends,
        steps,
        run_delta,
        started_at,
        time.monotonic() - wall_start,
    )
    report["load_generator"] = {"driver": config.driver, "processes": driver.processes,
                                "errors": driver.exceptions()}  # fmt: skip
    if any(step.get("think_ms") for step in steps):
        delay = batch_delay_ms(config.urls[0], plan.model, config.api_key, config.timeout_s)
        report["latency_envelope"] = envelope_section(steps, delay)
    if any(ceilings):
        report["ceilings"] = ceilings_section(*ceilings, steps)
        log(f"loadtest: {report['ceilings']['verdict']}")
    if layer_records is not None:
        report["layer_bench"] = layer_bench_section(
            config.layer_bench, layer_records, list(fullest.values()), plan.model, measured
        )
    try:
        from loadtest.plots import write_plots
    except ImportError:  # a bare GPU host: `python -m loadtest.plots <out>` draws them later
        log("loadtest: matplotlib is missing; plots skipped (python -m loadtest.plots later)")
    else:
        report["plots"] = write_plots(report, config.out, config.plot_layers)
    json_path, md_path = write_report(report, config.out)
    print(side_by_side_markdown(report))
    log(f"loadtest: {conclusion(report)}")
    for name, why in report["plots_omitted"].items():
        log(f"loadtest: {name} not drawn: {why}")
    log(f"loadtest: report in {md_path} and {json_path}")
    totals = report["totals"]
    log(json.dumps({"requests": totals["requests"], "ok": totals["ok"],
                    "errors_by_status": totals["errors_by_status"]}))  # fmt: skip
    return 0 if totals["ok"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    for line in unknown_setting_warnings():
        log(f"loadtest: warning: {line}")
    try:
        config = load_config()
    except LoadtestConfigError as exc:
        log(f"loadtest: {exc}")
        return 2
    return run(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
