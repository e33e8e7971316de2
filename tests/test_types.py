"""The contracts a new family, rule, method, positional strategy or canonizer is written against
(``hooks/base.py``, ``rules/base.py``, ``positional/base.py``, ``canonizers/base.py``) are checked
by a type checker, so a family that returns the wrong type or forgets a method fails here."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy", reason="mypy is in the dev extra (pip install -e '.[dev]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKED = ["lens_palrp/hooks", "lens_palrp/positional", "lens_palrp/rules", "lens_palrp/canonizers",
           "lens_palrp/engine.py", "lens_palrp/methods.py", "lens_palrp/roles.py", "lens_palrp/records.py"]


def test_contract_modules_type_check(tmp_path):
    cmd = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-error-summary",
           "--cache-dir", str(tmp_path / "mypy"), *CHECKED]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert run.returncode == 0 and not errors, "\n".join(errors) or run.stdout + run.stderr
