"""Command line: ``python -m fastbn {bench,gpu-check} [...]`` and ``python -m fastbn --version``."""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

USAGE = "usage: python -m fastbn [--version] {bench,gpu-check} [--help] [options]"
COMMANDS = {
    "bench": "time fastbn against naive NumPy, PyTorch and the memory roofline",
    "gpu-check": "run the CUDA checks and the GPU bench on a real device (fastbn.gpu_check)",
}


def version() -> str:
    """fastbn's version from the installed package's metadata (no numba import)."""
    try:
        return metadata.version("fastbn")
    except metadata.PackageNotFoundError:
        return "unknown (fastbn is not installed: pip install -e .)"


def _gpu_check(argv: list[str]) -> int:
    try:
        gpu_check = importlib.import_module("fastbn.gpu_check")
    except ModuleNotFoundError as exc:
        if exc.name != "fastbn.gpu_check":
            raise  # the module is there but something it needs is not: show that
        print("gpu-check is not available in this fastbn (no fastbn.gpu_check module)",
              file=sys.stderr)
        return 2
    return gpu_check.main(argv)


def _bench(argv: list[str]) -> int:
    from .bench.cli import main  # numba and the kernels load only when asked
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"fastbn {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\ncommands:\n" + "\n".join(f"  {name:<10} {text}"
                                                     for name, text in COMMANDS.items()))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        return _bench(rest)
    if command == "gpu-check":
        return _gpu_check(rest)
    print(f"{USAGE}\nunknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
