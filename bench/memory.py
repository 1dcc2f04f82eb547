"""Extra peak memory of one cold call, in a fresh process.

    python -m bench.memory SUITE {convlens,oracle} METHOD

In a long-running process freed memory stays resident, so a second call shows no growth; a fresh
process whose model is loaded and warmed with one forward shows what the call itself needs.
Prints the extra peak resident memory in MB.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import convlens as cl

from .common import PeakMemory, setup


def main() -> None:
    suite_name, library, method = sys.argv[1:4]
    suite = importlib.import_module(f"bench.{suite_name}")
    model, x, target = setup()
    if library == "oracle":
        run = suite.oracles(model.module, x, target)[method]
    else:

        def run():
            settings = suite.SETTINGS.get(method, {})
            return cl.explain(model, x, method, target=target, progress=False, **settings)

    with PeakMemory() as memory:
        run()
    print(f"{memory.extra_mb:.1f}")


if __name__ == "__main__":
    main()
