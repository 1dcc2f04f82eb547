"""An oracle in its own fresh process, as its users run it: ``python -m bench.fresh SUITE NAME``.

The process loads the bundled model with the default allocator settings, prints ``ready``,
then runs the oracle once per ``run`` line on stdin and prints ``done``. The parent times the
round trip, alternating with convlens (``common.FreshProcess``).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .common import setup, synchronise


def main() -> None:
    suite_name, name = sys.argv[1:3]
    suite = importlib.import_module(f"bench.{suite_name}")
    model, x, target = setup()
    oracle = suite.oracles(model.module, x, target)[name]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            oracle()
            synchronise()
            print("done", flush=True)


if __name__ == "__main__":
    main()
