"""The `escort` command: serve, benchmark, prune.

Each subcommand hands its remaining arguments to the module that owns the work, so the heavy
imports (torch, CuPy, uvicorn) happen only for the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); `bench` takes a second word.
_COMMANDS = {
    "serve": ("service.app", "run the HTTP service (settings from ESCORT_* variables)"),
    "prune": ("service.engine.prune_cli", "write a pruned checkpoint and a sparsity report"),
    "fetch-models": ("service.engine.fetch_cli", "check that the configured models' weights load"),
}
_BENCHES = {
    "layers": ("service.kernels.bench", "time the Escort kernel against cuDNN and lowering"),
    "model": ("service.engine.bench", "time whole models on every backend"),
}


def _run(module: str, argv: list[str]) -> int:
    entry = importlib.import_module(module).main
    result = entry(argv)
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="escort", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in _COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks: " + ", ".join(_BENCHES))
    bench.add_argument("what", choices=sorted(_BENCHES))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in _COMMANDS:
        return _run(_COMMANDS[command][0], rest)
    if command == "bench" and rest and rest[0] in _BENCHES:
        return _run(_BENCHES[rest[0]][0], rest[1:])
    parser.parse_args(argv)  # prints a usage error and exits 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
