"""Every optimizer preset trains bitwise as it did when ``reference/preset_runs.json`` was written.

Refactors of the config, builder and optimizer wiring must not change a single result; see
``tests/reference/preset_runs.py`` for the cases and how to regenerate the file when a change
is meant to alter the numerics.
"""

from __future__ import annotations

import json

import pytest
from reference.preset_runs import CASES, REFERENCE, run_case

EXPECTED = json.loads(REFERENCE.read_text())


def test_reference_covers_every_case() -> None:
    assert sorted(EXPECTED) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_preset_matches_reference(case: str, tmp_path, data_root) -> None:
    got = run_case(case, tmp_path, data_root=data_root)
    assert got == EXPECTED[case], f"{case}: {got} != reference {EXPECTED[case]}"
