"""Process defaults for the ``convlens`` command, set on import, before torch loads.

When this process is the ``convlens`` command (and only then), OpenMP's waiting threads sleep
instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the user set the variable. Spinning
threads take the cores another process needs: on a loaded machine torch then runs several times
slower (SmoothGrad on one photo beside two busy processes: 19.1 s instead of 7.4 s). libgomp
reads the variable once, when torch loads, so ``convlens/__init__.py`` imports this module
before anything that imports torch. ``import convlens`` in any other program changes nothing.
"""

from __future__ import annotations

import os
import sys

__all__ = ["COMMANDS", "command_line_defaults"]

# the names the console script runs under
COMMANDS = ("convlens", "convlens.exe")


def command_line_defaults(argv0: str | None = None) -> bool:
    """Set the command's defaults when ``argv0`` (``sys.argv[0]``) is the ``convlens``
    command; returns whether it is."""
    name = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    if name not in COMMANDS:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


command_line_defaults()
