"""Tests that need ../shared skip without it, naming what is missing; with FLANTUNE_REQUIRE_SHARED=1,
which CI sets, they fail instead, so a green CI run has run them all."""

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT

PROBE = """
from .conftest import SCIQ, need


def test_needs_a_model(t5_small_path):
    pass


def test_needs_the_sciq_rows():
    need(SCIQ)


def test_needs_nothing():
    pass
"""


@pytest.fixture
def repo_without_shared(tmp_path):
    """A repository holding this project's tests/conftest.py and three tests, with no ../shared beside it."""
    tests = tmp_path / "repo" / "tests"
    tests.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", tests / "conftest.py")
    (tests / "__init__.py").write_text("")
    (tests / "test_probe.py").write_text(PROBE)
    assert not (tmp_path / "shared").exists()
    return tests.parent


def run_pytest(repo, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FLANTUNE_REQUIRE_SHARED"}
    environ.update(env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", COLUMNS="1000")
    return subprocess.run([sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "tests"],
                          cwd=repo, env=environ, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_missing_shared_assets_skip_and_say_what_is_missing(repo_without_shared):
    result = run_pytest(repo_without_shared)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "1 passed, 2 skipped" in out
    shared = repo_without_shared.parent / "shared"
    for missing in (shared / "assets" / "flan-t5-small", shared / "data" / "sciq" / "valid.json"):
        assert f"{missing} is not present: the shared test assets" in out, out
    assert out.count("(FLANTUNE_REQUIRE_SHARED=1 makes this a failure)") == 2


def test_missing_shared_assets_fail_when_required(repo_without_shared):
    result = run_pytest(repo_without_shared, FLANTUNE_REQUIRE_SHARED="1")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    # The fixture's failure is an error at setup, need() in a test body a failure: both fail the run.
    assert "1 failed, 1 passed, 1 error" in out
    assert "ERROR tests/test_probe.py::test_needs_a_model" in out
    assert "FAILED tests/test_probe.py::test_needs_the_sciq_rows" in out
    shared = repo_without_shared.parent / "shared"
    for missing in (shared / "assets" / "flan-t5-small", shared / "data" / "sciq" / "valid.json"):
        assert f"FLANTUNE_REQUIRE_SHARED=1 and {missing} is not present" in out, out
    assert "skipped" not in out


def test_ci_requires_the_shared_assets_and_runs_the_readme_test_command():
    command = 'pip install -e ".[test]" && ruff check . && pytest -n 2 --dist loadfile'
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in lines
    exported = [
        i for i, line in enumerate(lines) if line.split()[:2] == ["export", "FLANTUNE_REQUIRE_SHARED=1"]
    ]
    assert exported and exported[0] < lines.index(command)
