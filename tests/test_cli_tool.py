"""The command line feels like one tool (issue 18, part 6): help per ``features`` kind with
defaults shown, ``--param`` in ``features`` too, OpenMP's passive waiting set for the
``convlens`` command before torch loads, and messages that start on a line of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from convlens.cli import main


def test_each_features_kind_has_its_own_help_with_defaults(capsys):
    texts = {}
    for kind in ("filters", "patches", "class-model", "dissect"):
        with pytest.raises(SystemExit):
            main(["features", kind, "--help"])
        texts[kind] = capsys.readouterr().out
    assert len(set(texts.values())) == 4
    assert "--channel" in texts["patches"] and "--channel" not in texts["filters"]
    assert "--concepts" in texts["dissect"] and "--target" in texts["class-model"]
    assert "--k K" in texts["patches"] and "(default: 9)" in texts["patches"]
    assert "Zeiler & Fergus" in texts["patches"]
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = capsys.readouterr().out
    assert "(default: convlens-output)" in text and "(default: 20)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_features_take_param(tmp_path, capsys):
    out = tmp_path / "features"
    args = ["features", "class-model", "--model", "shapes-cnn", "--target", "circle"]
    args += ["--steps", "2", "--param", "lr=0.05", "--param", "parametrization='pixel'"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "class-model.json").read_text())
    assert summary["params"] == {"lr": 0.05, "parametrization": "pixel", "steps": 2}
    bad = ["features", "filters", "--model", "shapes-cnn", "--param", "bogus=1"]
    assert main([*bad, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "features filters takes no parameter 'bogus'; it takes max_filters" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x").exists()
    both = [*args[:6], "--steps", "2", "--param", "steps=3", "--out", str(tmp_path / "y")]
    assert main(both) == 2
    assert "give --steps or --param steps=..., not both" in capsys.readouterr().err


PROBE = (
    "import os, sys; sys.argv[0] = {argv0!r}; import convlens; "
    "print(os.environ.get('OMP_WAIT_POLICY'))"
)


@pytest.mark.parametrize(
    ("argv0", "given", "expected"),
    [
        ("/venv/bin/convlens", None, "PASSIVE"),  # the command, the user set nothing
        ("/venv/bin/convlens", "ACTIVE", "ACTIVE"),  # the user's own setting wins
        ("my_script.py", None, "None"),  # `import convlens` elsewhere changes nothing
    ],
)
def test_the_command_sets_passive_openmp_waiting_unless_the_user_did(argv0, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv0=argv0)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == expected


def test_the_setting_comes_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, when torch is imported: the module that sets it
    must be imported first."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import convlens"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    order = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert order.index("convlens._command_line") < order.index("torch")


def test_an_error_starts_on_a_line_of_its_own_after_a_progress_bar(monkeypatch, capsys):
    from tqdm.auto import tqdm

    from convlens.cli import commands
    from convlens.cli.requests import UsageError

    def half_done(args):
        bar = tqdm(total=10, desc="report", file=sys.stderr, mininterval=0)
        bar.update(3)
        raise UsageError("something the user asked is wrong")

    monkeypatch.setattr(commands, "run_methods", half_done)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").rstrip("\n").split("\n")[-1]
    assert last == "convlens: error: something the user asked is wrong", repr(err)
