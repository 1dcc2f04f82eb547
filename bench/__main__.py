"""Run a benchmark suite: ``python -m bench gradient``.

OMP_WAIT_POLICY=PASSIVE is set before torch is imported: on a shared 2-core machine, OpenMP's
default spin-waiting can slow torch by an order of magnitude when another process competes.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SUITES = ("gradient", "cam", "perturbation", "relevance", "features", "audit", "devices")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
        print(
            f"usage: python -m bench {{{','.join(SUITES)}}} [--repeats N] [--device cuda]",
            file=sys.stderr,
        )
        return 2
    import importlib

    suite = importlib.import_module(f"bench.{sys.argv[1]}")
    return suite.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
