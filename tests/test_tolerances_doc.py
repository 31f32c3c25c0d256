"""docs/tolerances.md states the same table as bimacosr/parity/tolerances.py, row for row."""
from bimacosr.parity.tolerances import TOLERANCES
from tests.conftest import REPO


def test_doc_table_equals_the_code_table():
    rows = {}
    for line in (REPO / "docs/tolerances.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`") and cells[0].strip("`") in TOLERANCES:
            rows[cells[0].strip("`")] = tuple(float(c) for c in cells[1:4])
    assert rows == {name: (t.atol, t.ulps, t.floor_factor) for name, t in TOLERANCES.items()}
    assert all(t.reason for t in TOLERANCES.values())
