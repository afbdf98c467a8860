"""The `escort` command: serve, benchmark, prune.

Each subcommand hands its remaining arguments to the module that owns the work, so the heavy
imports (torch, CuPy, uvicorn) happen only for the command that needs them. The flags of
`escort serve` are parsed here (`parse_serve_args`) for service.app's main().
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import NoReturn, get_args

# subcommand -> (module, help); `bench` takes a second word.
_COMMANDS = {
    "serve": ("service.app", "run the HTTP service (flags, ESCORT_* variables, a TOML file)"),
    "prune": ("service.engine.prune_cli", "write a pruned checkpoint and a sparsity report"),
    "fetch-models": ("service.engine.fetch_cli", "check that the configured models' weights load"),
}
_BENCHES = {
    # The benchmarks live in the checkout's bench/, outside the installed package.
    "layers": ("bench.kernels.layers", "time the Escort kernel against cuDNN and lowering"),
    "model": ("bench.model.run", "time whole models on every backend"),
}


# The settings `escort serve` takes as flags: the ones people change per run. Every other
# setting stays an ESCORT_* variable, so that the flag list stays short enough to read.
SERVE_FLAGS = ("host", "port", "models", "backend", "backends", "device", "precision", "workers")


def version() -> str:
    """The installed package's version; 0.0.0 when run from a checkout that is not installed."""
    try:
        return metadata.version("escort-serve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class ServeArgs:
    """What `escort serve`'s command line asked for."""

    settings: dict[str, str] = field(default_factory=dict)  # setting name -> value as typed
    config: str | None = None  # --config: the TOML file, as ESCORT_CONFIG would name it


class _ServeParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own message names only the bad flag; list the good ones too.
        known = ", ".join(
            option
            for action in self._actions
            for option in action.option_strings
            if option.startswith("--")
        )
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nknown flags: {known}\n")


def _metavar(name: str) -> str:
    from service.config import Settings

    choices = get_args(Settings.model_fields[name].annotation)
    if choices and all(isinstance(choice, str) for choice in choices):
        return "{" + ",".join(choices) + "}"
    return name.upper()


def serve_parser(prog: str = "escort serve") -> argparse.ArgumentParser:
    # Imported here: `escort prune` and `escort bench` need no pydantic.
    from service.config import CONFIG_FILE_VAR, ENV_PREFIX, Settings, flag_name

    parser = _ServeParser(
        prog=prog,
        description="Run the HTTP service. A flag wins over its ESCORT_* variable, which "
        "wins over the TOML file, which wins over the default.",
        epilog="Every other setting is an ESCORT_* environment variable (or a key of the TOML "
        "file); `python -m service.config` lists them all.",
        allow_abbrev=False,  # --po must not quietly mean --port
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML file with any of the settings (as {CONFIG_FILE_VAR})",
    )
    for name in SERVE_FLAGS:
        description = Settings.model_fields[name].description or ""
        # Values stay strings: Settings parses and checks them exactly as it does the
        # environment's, so a flag and its variable accept the same text.
        parser.add_argument(
            flag_name(name),
            dest=name,
            metavar=_metavar(name),
            help=f"{description} ({ENV_PREFIX}{name.upper()})".replace("%", "%%"),
        )
    return parser


def parse_serve_args(argv: Sequence[str], prog: str = "escort serve") -> ServeArgs:
    """`escort serve`'s flags; exits 2 (after a message) on an unknown flag, 0 after --help."""
    args = vars(serve_parser(prog).parse_args(list(argv)))
    config = args.pop("config")
    return ServeArgs({k: v for k, v in args.items() if v is not None}, config)


def _run(module: str, argv: list[str]) -> int:
    try:
        entry = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise
        print(
            f"escort: {module} is not importable here: it ships in the source checkout's "
            "bench/ folder, not in the installed package; run `escort` from a checkout",
            file=sys.stderr,
        )
        return 2
    result = entry(argv)
    return int(result or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="escort", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"escort {version()}")
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
    if argv[0] == "--version":
        print(f"escort {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in _COMMANDS:
        return _run(_COMMANDS[command][0], rest)
    if command == "bench" and rest and rest[0] in _BENCHES:
        return _run(_BENCHES[rest[0]][0], rest[1:])
    parser.parse_args(argv)  # prints a usage error and exits 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
