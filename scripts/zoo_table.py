"""The README's architecture table, generated from the test zoo: every registered method on every
miniature family of ``tests/zoo.py``, with the settings of ``tests/test_zoo.py``.

Run: ``.venv/bin/python scripts/zoo_table.py`` (about 20 s); it prints the Markdown table, which
``tests/test_zoo.py`` checks against the README. A cell is ✓ when every method of the family
gives its result; otherwise it names the methods that refuse and why (each refusal is a
one-line ``RequestError``; the test zoo checks the results' invariants where the methods run).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_lifecycle import classes
from test_zoo import SETTINGS, TARGET
from zoo import ZOO, zoo_input

import convlens as cl
from convlens.checks import RequestError
from convlens.registry import FAMILIES

# what a refusal says, in a few words
REASONS = [
    (r"applies (\w+)", r"\1"),
    (r"no rule for (\w+)", r"\1"),
    (r"sum to .* not f\(x\)", "an operation without a rule"),
    (r"does not read that pooling", "no GAP + linear head"),
    (r"reads negative values", "negative activations"),
]


def reason(message: str) -> str:
    for pattern, short in REASONS:
        found = re.search(pattern, message)
        if found:
            return found.expand(short)
    return message.split(";")[0][:40]


def table() -> str:
    """The Markdown table."""
    x = zoo_input()
    refusals: dict[tuple[str, str], list[str]] = {}
    for family, build in ZOO.items():
        for method in cl.list_methods():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cl.explain(build(), x, method, target=classes(method, TARGET), progress=False,
                               **SETTINGS.get(method, {}))  # fmt: skip
            except RequestError as error:
                key = (family, cl.get_method(method).family)
                refusals.setdefault(key, []).append(f"{method} ({reason(str(error))})")
    lines = ["| family | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for family in ZOO:
        cells = []
        for group in FAMILIES:
            refused = refusals.get((family, group))
            cells.append("✓" if not refused else "✓ except " + ", ".join(refused))
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
