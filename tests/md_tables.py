"""Reading the experiments' markdown tables back, for tests that hold every cell to results.json."""

from __future__ import annotations

import re


def parse_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """``{section heading: [row as {column: cell}]}`` for every markdown table under a ``###`` heading."""
    tables, heading, header = {}, None, None
    for line in md.splitlines():
        if line.startswith("### "):
            heading, header = line[4:].strip(), None
        elif line.startswith("|") and heading is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                tables.setdefault(heading, []).append(dict(zip(header, cells, strict=True)))
        else:
            header = None
    return tables


def check_cell(cell: str, stat: dict, where: str):
    """A ``mean ± ci95`` / ``mean`` / ``-`` cell equals ``stat`` (a ``common.t_interval`` dict) to
    its printed digits."""
    if cell == "-":
        assert stat["mean"] is None, where
        return
    m = re.fullmatch(r"(-?\d+(?:\.(\d+))?)(?: ± (\d+(?:\.\d+)?))?", cell)
    assert m, f"{where}: unparsable cell {cell!r}"
    tol = 0.5 * 10 ** -len(m.group(2) or "") + 1e-9
    assert abs(float(m.group(1)) - stat["mean"]) <= tol, (where, cell, stat["mean"])
    if m.group(3) is None:
        assert stat["ci95"] is None, where
    else:
        assert abs(float(m.group(3)) - stat["ci95"]) <= tol, (where, cell, stat["ci95"])
