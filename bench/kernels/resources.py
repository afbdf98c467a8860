"""What each registered kernel instantiation costs in registers, spills and shared memory, as
ptxas reports it: NVRTC compiles the registry's sources (variants.py) for a GPU architecture
on any host, no GPU needed (NVRTC and its Python bindings come with torch's CUDA wheels).

    python -m bench.kernels.resources [--arch sm_90] [--out DIR]

prints a table and, with --out, writes `resources-<arch>.{json,md}`. It is also the CPU-side
compile check of every kernel (tests/bench/test_kernel_resources.py): a source that NVRTC
rejects fails here with NVRTC's log, before any GPU sees it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# The options the serving module compiles with (service/kernels/cuda.py), plus the target.
OPTIONS = ("-std=c++17",)


class CompileError(RuntimeError):
    """NVRTC rejected the sources; the message holds its log."""


@dataclass(frozen=True)
class Resources:
    kernel: str  # the name expression, e.g. "escort_direct<2>"
    variant: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    static_shared: int  # bytes (dynamic shared memory is the launch's, not here)


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415 - optional: torch's CUDA wheels
    except ImportError as exc:  # pragma: no cover - depends on the wheel
        raise CompileError(f"NVRTC's Python bindings are not importable: {exc}") from exc
    return nvrtc


def _check(result, what: str) -> None:
    nvrtc = _nvrtc()
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what}: {nvrtc.nvrtcGetErrorString(result)[1].decode()}")


def compile_log(source: str, names: list[str], arch: str) -> tuple[str, dict[str, str]]:
    """ptxas's verbose log for `source` compiled for `arch`, and each name expression's
    mangled name. Raises CompileError with NVRTC's log when the source does not compile."""
    nvrtc = _nvrtc()
    result, program = nvrtc.nvrtcCreateProgram(source.encode(), b"escort.cu", 0, [], [])
    _check(result, "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(program, name.encode())[0], name)
        options = [o.encode() for o in (*OPTIONS, f"-arch={arch}", "-Xptxas=-v")]
        (compiled,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        buffer = b" " * size
        nvrtc.nvrtcGetProgramLog(program, buffer)
        log = buffer.rstrip(b"\0 ").decode(errors="replace")
        if compiled != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC could not compile the kernels for {arch}:\n{log}")
        lowered = {}
        for name in names:
            result, mangled = nvrtc.nvrtcGetLoweredName(program, name.encode())
            _check(result, f"lowered name of {name}")
            lowered[name] = mangled.decode()
        return log, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(program)


_ENTRY = re.compile(r"Compiling entry function '(?P<mangled>[^']+)'")
_SPILLS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads"
)
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


def parse_log(log: str) -> dict[str, dict[str, int]]:
    """mangled name -> {registers, spill_stores, spill_loads, stack, static_shared}."""
    found: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        if entry := _ENTRY.search(line):
            current = found.setdefault(entry["mangled"], {})
        elif current is None:
            continue
        elif spills := _SPILLS.search(line):
            current.update(
                stack=int(spills["stack"]),
                spill_stores=int(spills["stores"]),
                spill_loads=int(spills["loads"]),
            )
        elif used := _USED.search(line):
            current["registers"] = int(used["regs"])
            smem = _SMEM.search(line)
            current["static_shared"] = int(smem["smem"]) if smem else 0
    return found


def measure(arch: str = "sm_90") -> list[Resources]:
    """Every registered instantiation's resources for `arch`, in registry order."""
    from service.kernels.variants import VARIANTS, sources  # noqa: PLC0415 - imports torch

    names = [name for variant in VARIANTS for name in variant.kernel_names]
    owner = {name: variant.name for variant in VARIANTS for name in variant.kernel_names}
    log, lowered = compile_log(sources(), names, arch)
    parsed = parse_log(log)
    rows = []
    for name in names:
        stats = parsed.get(lowered[name])
        if stats is None or "registers" not in stats:
            raise CompileError(f"ptxas reported nothing for {name} ({lowered[name]}):\n{log}")
        rows.append(
            Resources(
                kernel=name,
                variant=owner[name],
                registers=stats["registers"],
                spill_stores=stats.get("spill_stores", 0),
                spill_loads=stats.get("spill_loads", 0),
                stack=stats.get("stack", 0),
                static_shared=stats["static_shared"],
            )
        )
    return rows


def markdown(rows: list[Resources], arch: str) -> str:
    lines = [
        f"ptxas resources per kernel instantiation, {arch} (NVRTC, `-std=c++17`)",
        "",
        "| kernel | variant | registers | spill stores (B) | spill loads (B) | stack (B) "
        "| static smem (B) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.kernel}` | {r.variant} | {r.registers} | {r.spill_stores} | "
            f"{r.spill_loads} | {r.stack} | {r.static_shared} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (H100/H200)")
    parser.add_argument("--out", type=Path, help="folder for resources-<arch>.{json,md}")
    args = parser.parse_args(argv)
    try:
        rows = measure(args.arch)
    except CompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = markdown(rows, args.arch)
    print(table, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"resources-{args.arch}"
        stem.with_suffix(".json").write_text(
            json.dumps({"arch": args.arch, "kernels": [asdict(r) for r in rows]}, indent=1) + "\n"
        )
        stem.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
