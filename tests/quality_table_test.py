"""``experiments/quality_table.py``'s command line: field IO options are checked before any work.

The table itself needs trained runs (minutes each); the README gives its commands and figures.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "quality_table.py")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, "--runs", "no-such-run", *args],
                          capture_output=True, text=True, timeout=300)


def test_field_io_options_are_validated_in_one_line():
    p = _run("--field-io", "bogus=1")
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert "'bogus' is not a field IO option" in last and "smooth" in last
    p = _run("--field-io", "smooth")
    assert p.returncode == 2 and "expected KEY=VALUE" in p.stderr.strip().splitlines()[-1]


def test_field_io_option_values_are_python_literals():
    code = ("import sys; sys.path.insert(0, 'experiments'); import quality_table as q; "
            "print(q._option('smooth=1.5'), q._option('levels=(2, 1)'), "
            "q._option('diffeomorphic=False'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "('smooth', 1.5) ('levels', (2, 1)) ('diffeomorphic', False)")
