"""mutmut 2 hook module, loaded by ``mutmut`` itself (it imports ``mutmut_config`` from ``sys.path``).

:mod:`tools.mutation` puts ``tools/`` on ``PYTHONPATH`` for the ``mutmut run`` it starts and passes two
settings through the environment:

- ``IDFORGE_MUTATION_SAMPLE``: a JSON file listing the ``[line_number, index]`` of the mutants to test;
  every other mutant is skipped (bounded runs with ``--max-mutants``).
- ``IDFORGE_MUTATION_TIMEOUT``: seconds one mutant's test run may take. mutmut 2 kills a run after
  10 x the baseline time; the hook sets the baseline each mutant sees so that limit is this timeout.
"""

from __future__ import annotations

import json
import os

_SAMPLE: set[tuple[int, int]] | None = None


def _sample() -> set[tuple[int, int]] | None:
    global _SAMPLE
    path = os.environ.get("IDFORGE_MUTATION_SAMPLE")
    if path and _SAMPLE is None:
        with open(path) as f:
            _SAMPLE = {(int(line), int(index)) for line, index in json.load(f)}
    return _SAMPLE


def pre_mutation(context) -> None:
    sample = _sample()
    if sample is not None and (context.mutation_id.line_number, context.mutation_id.index) not in sample:
        context.skip = True
        return
    timeout = os.environ.get("IDFORGE_MUTATION_TIMEOUT")
    if timeout:
        context.config.baseline_time_elapsed = float(timeout) / 10.0
