"""Command line: ``python -m fastbn bench [...]`` (see ``python -m fastbn bench --help``)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m fastbn bench [--help] [options]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\ncommands:\n  bench    time fastbn against naive NumPy, PyTorch and "
              "the memory roofline")
        return 0 if argv else 2
    if argv[0] != "bench":
        print(f"{USAGE}\nunknown command {argv[0]!r}", file=sys.stderr)
        return 2
    from .bench.report import main as bench_main  # numba and the kernels load only when asked
    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
