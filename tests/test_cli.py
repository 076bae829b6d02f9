"""The ``pfedsam`` command as a new user meets it: every subcommand listed, every flag explained, fast help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pfedsam.cli import build_parser

SUBCOMMANDS = ["info", "config", "synth", "train", "job", "export", "predict"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text
    assert list(_subparsers(build_parser())) == SUBCOMMANDS


@pytest.mark.parametrize("name", ["", *SUBCOMMANDS])
def test_every_flag_and_argument_has_help(name):
    parser = build_parser()
    parser = _subparsers(parser)[name] if name else parser
    missing = [a.dest for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"pfedsam {name}: no help for {missing}"


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom pfedsam.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for sub in ('job', 'export', 'predict'):\n"
            "    try:\n        main([sub, '--help'])\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'nvflare', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-500:]
