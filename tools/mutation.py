"""Mutation testing of idforge's core modules with mutmut 2, one module at a time, bounded.

A mutant is the module with one small change (``<`` -> ``<=``, ``2`` -> ``3``, ``and`` -> ``or``,
a string altered ...). The tests that exercise the module should fail on it ("killed"); a mutant
under which they still pass ("survived") is a behaviour no test pins down. This script, for each
module named in :data:`MODULES`:

1. lists the module's mutants with mutmut's own generator and, with ``--max-mutants N``, keeps an
   evenly spaced sample of N (the rest are skipped through the hook in ``tools/mutmut_config.py``);
2. runs ``mutmut run`` on that one file with a runner that starts pytest on only the module's fast
   tests (``OMP_NUM_THREADS=1 python -m pytest -x -q -p no:cacheprovider <tests>``; any non-zero
   exit, a collection error included, counts as killed) and a per-mutant timeout;
3. restores the source file if anything is left mutated, stores the figures in
   ``docs/mutation_results.json`` and rewrites ``docs/mutation_report.md`` from all stored results.

mutmut 2 (not 3) because it mutates the file in place: idforge is installed editable with a
setuptools ``package-dir`` map (``idforge.eval`` -> ``eval/``), so the tests import the mutated file
directly; mutmut 3 copies sources to ``mutants/`` and the editable finder would never import them.

Equivalent mutants (the change cannot alter behaviour) are listed with a one-line reason in
``tools/mutation_equivalent.yaml`` and leave the denominator:
kill ratio = killed / (tested - equivalent).

    python tools/mutation.py --list
    python tools/mutation.py eval/cmmd.py eval/identification.py --max-mutants 60 --timeout 120
    python tools/mutation.py --report-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "mutation_results.json"
REPORT = ROOT / "docs" / "mutation_report.md"
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.yaml"
CACHE = ROOT / ".mutmut-cache"

# module file -> the fast test files (or node ids) that exercise it. Each mutant costs one pytest
# start over these, so keep them to the tests that import the module and run in seconds.
MODULES: dict[str, list[str]] = {
    "models/adapter.py": ["tests/models/test_adapter.py", "tests/models/test_adapter_mutants.py"],
    "models/attention.py": ["tests/models/test_attention.py", "tests/models/test_attention_mutants.py"],
    "models/reference_attention.py": [
        "tests/models/test_reference_attention.py",
        "tests/models/test_reference_attention_mutants.py",
    ],
    "models/losses.py": ["tests/models/test_losses.py", "tests/models/test_losses_mutants.py"],
    "train/module.py": [
        "tests/train/test_module.py",
        "tests/train/test_module_faults.py",
        "tests/train/test_module_mutants.py",
    ],
    "inference/pipeline.py": ["tests/inference/test_pipeline.py", "tests/inference/test_pipeline_mutants.py"],
    "inference/export.py": ["tests/inference/test_export.py", "tests/inference/test_export_mutants.py"],
    "eval/identity.py": ["tests/eval/test_runner.py", "tests/eval/test_identity_mutants.py"],
    "eval/identification.py": [
        "tests/eval/test_metrics.py::test_fs_ip_and_undetected_on_hand_made_embeddings",
        "tests/eval/test_metrics.py::test_identification_top1_top5_and_chance",
        "tests/eval/test_metrics.py::test_flashface_sim_target_sim_ref_paste",
        "tests/eval/test_identification_mutants.py",
    ],
    "eval/cmmd.py": [
        "tests/eval/test_metrics.py::test_cmmd_matches_direct_unbiased_estimator",
        "tests/eval/test_cmmd_mutants.py",
    ],
    "eval/fid.py": [
        "tests/eval/test_metrics.py::test_frechet_distance_matches_scipy_reference",
        "tests/eval/test_metrics.py::test_fiq_arithmetic",
        "tests/eval/test_fid_mutants.py",
    ],
    "data_pipeline/job.py": [
        "tests/data_pipeline/test_resume.py",
        "tests/data_pipeline/test_curate.py",
        "tests/data_pipeline/test_job_mutants.py",
    ],
    "data_pipeline/finalize.py": [
        "tests/data_pipeline/test_finalize.py",
        "tests/data_pipeline/test_finalize_mutants.py",
    ],
}

STATUS = {
    "ok_killed": "killed",
    "ok_suspicious": "killed",  # killed, but slower than usual
    "bad_survived": "survived",
    "bad_timeout": "timeout",
    "skipped": "skipped",
    "untested": "untested",
}


def runner_command(tests: list[str], python: str = sys.executable) -> str:
    """The per-mutant test command: only ``tests``, first failure stops, any failure exit is 1.

    mutmut 2 counts only exit status 1 as a failing run; pytest exits 2 on a collection error (a
    mutant that breaks the import), so the shell wrapper folds every non-zero status into 1.
    """
    pytest = f"{shlex.quote(python)} -m pytest -x -q -p no:cacheprovider {' '.join(tests)}"
    return f"sh -c {shlex.quote(pytest + ' || exit 1')}"


def list_mutants(module: str) -> list[tuple[int, int, str]]:
    """(line_number, index, line text) of every mutant mutmut generates for ``module``."""
    from mutmut import Context, list_mutations

    context = Context(source=(ROOT / module).read_text(), filename=module, dict_synonyms=[])
    return [(m.line_number, m.index, m.line) for m in list_mutations(context)]


def sample(mutants: list, max_mutants: int | None) -> list:
    """An evenly spaced, deterministic sample of at most ``max_mutants`` (all of them when None)."""
    if max_mutants is None or len(mutants) <= max_mutants:
        return list(mutants)
    step = len(mutants) / max_mutants
    return [mutants[int(i * step)] for i in range(max_mutants)]


def _diff(module: str, line: str, index: int, line_number: int) -> str:
    from mutmut import RelativeMutationID
    from mutmut.cache import _get_unified_diff

    mid = RelativeMutationID(line=line, index=index, line_number=line_number, filename=module)
    return _get_unified_diff(None, module, mid, [], update_cache=False)


def _read_cache(module: str) -> list[dict]:
    with sqlite3.connect(CACHE) as db:
        rows = db.execute(
            "SELECT l.line_number, l.line, m.'index', m.status FROM Mutant m JOIN Line l ON m.line = l.id "
            "JOIN SourceFile s ON l.sourcefile = s.id WHERE s.filename = ? ORDER BY l.line_number, m.'index'",
            (module,),
        ).fetchall()
    return [{"line_number": n, "line": text, "index": i, "status": STATUS[s]} for n, text, i, s in rows]


def run_module(module: str, max_mutants: int | None, timeout: float) -> dict:
    """mutmut on one module with its tests; returns the stored result (survivors with their diffs)."""
    if module not in MODULES:
        raise SystemExit(
            f"{module}: not in tools/mutation.py MODULES; add it with the tests that exercise it"
        )
    path = ROOT / module
    original = path.read_bytes()
    mutants = list_mutants(module)
    chosen = sample(mutants, max_mutants)
    runner = runner_command(MODULES[module])
    cmd = [
        sys.executable, "-m", "mutmut", "run", "--paths-to-mutate", module, "--tests-dir", "tests/",
        "--runner", runner, "--simple-output", "--no-progress",
    ]  # fmt: skip
    CACHE.unlink(missing_ok=True)  # one module per cache: baseline time and results are per runner
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[n, i] for n, i, _ in chosen], f)
    env = dict(os.environ, OMP_NUM_THREADS="1", IDFORGE_MUTATION_SAMPLE=f.name)
    env["IDFORGE_MUTATION_TIMEOUT"] = str(timeout)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tools"), env.get("PYTHONPATH")]))
    start = dt.datetime.now()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    finally:
        os.unlink(f.name)
        if path.read_bytes() != original:  # an interrupted run can leave a mutant in place
            path.write_bytes(original)
            print(f"{module}: restored the original source left mutated by mutmut", file=sys.stderr)
        Path(str(path) + ".bak").unlink(missing_ok=True)
    if proc.returncode & 1:
        raise SystemExit(f"{module}: mutmut failed (exit {proc.returncode}); see its output above")
    rows = [r for r in _read_cache(module) if r["status"] not in ("skipped", "untested")]
    for r in rows:
        if r["status"] == "survived":
            r["diff"] = _diff(module, r["line"], r["index"], r["line_number"])
    argv = ["python", "tools/mutation.py", module, "--timeout", f"{timeout:g}"]
    if max_mutants is not None:
        argv += ["--max-mutants", str(max_mutants)]
    return {
        "module": module,
        "tests": MODULES[module],
        "mutants_in_module": len(mutants),
        "tested": len(rows),
        "command": " ".join(argv),
        "mutmut_command": shlex.join(["mutmut", *cmd[3:]]).replace(sys.executable, "python"),
        "date": start.strftime("%Y-%m-%d"),
        "minutes": round((dt.datetime.now() - start).total_seconds() / 60, 1),
        "mutants": [r for r in rows if r["status"] != "killed"],
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("killed", "survived", "timeout")},
    }


def load_equivalent() -> list[dict]:
    """Entries ``{file, line, index, reason}``: ``line`` is the stripped source line, as mutmut keys it."""
    if not EQUIVALENT.exists():
        return []
    entries = yaml.safe_load(EQUIVALENT.read_text()) or []
    for e in entries:
        if not {"file", "line", "index", "reason"} <= set(e):
            raise SystemExit(f"{EQUIVALENT}: entry {e} needs file, line, index and reason")
    return entries


def render(results: dict[str, dict], equivalent: list[dict]) -> str:
    """The Markdown report: a summary table, then per module its command and surviving mutants."""
    eq = {(e["file"], e["line"].strip(), int(e["index"])): e["reason"] for e in equivalent}
    out = [
        "# Mutation testing report",
        "",
        (
            "Written by `tools/mutation.py` (mutmut 2, in-place mutation; see its docstring). "
            "Kill ratio = killed / (tested - equivalent); equivalent mutants are listed with a reason in "
            "`tools/mutation_equivalent.yaml`. A module with `tested < mutants` was run on an evenly "
            "spaced sample (`--max-mutants`)."
        ),
        "",
        "| module | mutants | tested | killed | survived | timeout | equivalent | kill ratio | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sections = []
    for module in sorted(results):
        r = results[module]
        c = r["counts"]
        survivors = [m for m in r["mutants"] if m["status"] == "survived"]
        equiv = [m for m in survivors if (module, m["line"].strip(), m["index"]) in eq]
        live = [m for m in survivors if m not in equiv]
        denom = r["tested"] - len(equiv)
        ratio = f"{c['killed'] / denom:.1%}" if denom else "n/a"
        out.append(
            f"| `{module}` | {r['mutants_in_module']} | {r['tested']} | {c['killed']} | {len(live)} | "
            f"{c['timeout']} | {len(equiv)} | {ratio} | {r['minutes']} |"
        )
        sec = [
            f"## `{module}`",
            "",
            f"Run {r['date']}: `{r['command']}`  ",
            f"tests: {', '.join(f'`{t}`' for t in r['tests'])}  ",
            f"mutmut: `{r['mutmut_command']}`",
            "",
        ]
        if not live:
            sec.append("No surviving mutants.")
        for m in live:
            sec += [
                f"Survived, line {m['line_number'] + 1} (#{m['index']}):",
                "",
                "```diff",
                m["diff"].rstrip(),
                "```",
                "",
            ]
        for m in equiv:
            reason = eq[(module, m["line"].strip(), m["index"])]
            sec.append(
                f"- equivalent, line {m['line_number'] + 1} (#{m['index']}) `{m['line'].strip()}`: {reason}"
            )
        timeouts = [m for m in r["mutants"] if m["status"] == "timeout"]
        for m in timeouts:
            sec.append(f"- timeout, line {m['line_number'] + 1} (#{m['index']}) `{m['line'].strip()}`")
        sections += sec + [""]
    not_run = [m for m in MODULES if m not in results]
    if not_run:
        out += ["", "Not run yet (command for each):", ""]
        out += [f"- `python tools/mutation.py {m} --max-mutants 40 --timeout 300`" for m in not_run]
    return "\n".join(out + [""] + sections).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module files from MODULES, e.g. eval/cmmd.py")
    parser.add_argument("--all", action="store_true", help="every module in MODULES (slow: hours)")
    parser.add_argument("--max-mutants", type=int, default=None, help="evenly spaced sample per module")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    parser.add_argument("--list", action="store_true", help="print the module table and mutant counts")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from stored results")
    args = parser.parse_args(argv)
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module:34s} {len(list_mutants(module)):4d} mutants  {' '.join(tests)}")
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for module in list(MODULES) if args.all else args.modules:
        results[module] = run_module(module, args.max_mutants, args.timeout)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        CACHE.unlink(missing_ok=True)
    REPORT.write_text(render(results, load_equivalent()))
    print(f"wrote {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
