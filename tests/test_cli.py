"""The `cytologia` dispatcher: only the named command's module is imported; errors become exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cytologia.cli import COMMANDS, _requested, main


def test_only_first_positional_is_the_command() -> None:
    assert _requested(["-v", "bench", "synth", "score"]) == {"bench"}
    assert _requested(["score", "--truth", "folds"]) == {"score"}
    assert _requested(["nonsense"]) == set()


def test_every_command_has_help() -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0, name


def test_score_does_not_import_torch() -> None:
    probe = (
        "import sys, cytologia.cli as c\n"
        "try:\n    c.main(['score', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"
