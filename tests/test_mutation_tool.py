"""tools/mutation.py: its module table points at real files, sampling is bounded and deterministic,
the runner folds pytest's collection-error exit into mutmut's "killed", and the report's kill ratio
leaves equivalent mutants out of the denominator."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("idforge_mutation_tool", ROOT / "tools" / "mutation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_table_names_existing_sources_and_tests(tool):
    for module, tests in tool.MODULES.items():
        assert (ROOT / module).is_file(), module
        assert tests, module
        for t in tests:
            assert (ROOT / t.split("::")[0]).is_file(), t


def test_sample_is_evenly_spaced_bounded_and_deterministic(tool):
    items = list(range(10))
    assert tool.sample(items, None) == items
    assert tool.sample(items, 20) == items
    assert tool.sample(items, 4) == [0, 2, 5, 7]
    assert tool.sample(items, 4) == tool.sample(items, 4)


def test_runner_turns_any_pytest_failure_into_exit_1(tool, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 2\n")  # pytest's exit status for a collection error
    fake.chmod(0o755)
    argv = shlex.split(tool.runner_command(["tests/a.py", "tests/b.py::t"], python=str(fake)))
    assert argv[:2] == ["sh", "-c"]
    assert argv[2].endswith("-m pytest -x -q -p no:cacheprovider tests/a.py tests/b.py::t || exit 1")
    assert subprocess.run(argv, check=False).returncode == 1


def test_list_mutants_sees_mutmut_mutations(tool, tmp_path, monkeypatch):
    pytest.importorskip("mutmut", reason="mutmut is in the dev extra")
    (tmp_path / "m.py").write_text("def f(a):\n    return a < 2\n")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    mutants = tool.list_mutants("m.py")
    assert mutants and all(line == "    return a < 2" for _, _, line in mutants)
    assert {n for n, _, _ in mutants} == {1}  # mutmut numbers lines from 0


def test_report_kill_ratio_excludes_equivalent_mutants(tool):
    survivor = {
        "line_number": 3,
        "line": "    x = 1",
        "index": 0,
        "status": "survived",
        "diff": "-x = 1\n+x = 2",
    }
    other = dict(survivor, line="    y = 1", diff="-y = 1\n+y = 2")
    results = {
        "eval/cmmd.py": {
            "module": "eval/cmmd.py", "tests": ["t.py"], "mutants_in_module": 12, "tested": 10,
            "command": "python tools/mutation.py eval/cmmd.py", "mutmut_command": "mutmut run",
            "date": "2026-01-01", "minutes": 1.0, "mutants": [survivor, other],
            "counts": {"killed": 8, "survived": 2, "timeout": 0},
        }
    }  # fmt: skip
    equivalent = [{"file": "eval/cmmd.py", "line": "x = 1", "index": 0, "reason": "dead store"}]
    text = tool.render(results, equivalent)
    assert "| `eval/cmmd.py` | 12 | 10 | 8 | 1 | 0 | 1 | 88.9% |" in text  # 8 / (10 - 1)
    assert "+y = 2" in text and "+x = 2" not in text and "dead store" in text
    assert "python tools/mutation.py models/losses.py" in text  # not-run modules get their command
