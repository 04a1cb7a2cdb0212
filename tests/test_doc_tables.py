"""The result tables in the README and docs are the committed results, rendered by the code as it stands.

For each experiment: the committed ``docs/results/<name>/table.md`` equals what the experiment's own
table function renders from the committed ``results.json`` (so no hand-edited number), and every
table row of ``table.md`` appears verbatim in the docs page that presents it (so the page is not
stale). The README's quickstart table is checked cell by cell against the quickstart table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _render_e1(res):
    from jaxrlhf.experiments import e1_ood

    return e1_ood.table_markdown(res)


def _render_module(module: str):
    def render(res):
        import importlib

        return importlib.import_module(f"jaxrlhf.experiments.{module}").table_markdown(res)

    return render


def _render_e6(res):
    from jaxrlhf.experiments import e6_arike

    return e6_arike.tables_markdown(res)


def _render_quickstart(res):
    from jaxrlhf import quickstart

    return quickstart.format_table(res["table"])


# result folder -> (renderer, the docs page(s) that show its table)
TABLES = {
    "e1": (_render_e1, []),  # its page shows a column subset: test_e1_page_columns_match
    "e2": (_render_module("e2_frontier"), ["docs/experiments_e2.md"]),
    "e3": (_render_module("e3_shift"), ["docs/experiments_e3.md"]),
    "e4": (_render_module("e4_ablations"), ["docs/experiments_e4.md"]),
    "e5": (_render_module("e5_verifiable"), ["docs/experiments_e5.md"]),
    "e8": (_render_module("e8_critic_free"), ["docs/grpo.md"]),
    "e6": (_render_e6, ["docs/experiments_e6.md"]),
    "e7": (_render_module("e7_wang"), ["docs/experiments_e7.md"]),
    "quickstart": (_render_quickstart, ["docs/quickstart.md"]),
}


def _rows(markdown: str) -> list[str]:
    return [line.rstrip() for line in markdown.splitlines() if line.startswith("|")]


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_committed_table_is_rendered_from_results_json(name):
    render, _ = TABLES[name]
    res = json.loads((RESULTS / name / "results.json").read_text())
    committed = (RESULTS / name / "table.md").read_text()
    assert _rows(render(res)) == _rows(committed), f"docs/results/{name}/table.md differs from results.json"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_docs_page_shows_the_committed_table(name):
    _, pages = TABLES[name]
    rows = _rows((RESULTS / name / "table.md").read_text())
    assert rows, name
    for page in pages:
        text = (ROOT / page).read_text()
        missing = [r for r in rows if r not in text]
        assert not missing, f"{page} lacks these rows of docs/results/{name}/table.md: {missing[:3]}"


def test_readme_quickstart_table_matches_the_committed_run():
    readme = (ROOT / "README.md").read_text().splitlines()
    committed = {
        _cells(r)[0]: _cells(r) for r in _rows((RESULTS / "quickstart" / "table.md").read_text())[2:]
    }
    start = next(i for i, line in enumerate(readme) if line.startswith("| policy | gold reward"))
    header = _cells(readme[start])
    qs_header = _cells(_rows((RESULTS / "quickstart" / "table.md").read_text())[0])
    assert header == qs_header[: len(header)], (header, qs_header)
    shown = []
    for line in readme[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        policy = cells[0].split(" ")[0]  # "PPO (rollout 512, ...)" -> "PPO"
        assert cells[1:] == committed[policy][1 : len(cells)], (line, committed[policy])
        shown.append(policy)
    assert shown == list(committed), shown


def test_e1_page_columns_match_the_committed_table():
    """docs/experiments_e1.md shows a subset of E1's columns (scenario names shortened): each of its
    rows must equal a committed row on every column the two tables share except the scenario."""
    committed = _rows((RESULTS / "e1" / "table.md").read_text())
    c_head = _cells(committed[0])
    c_rows = [dict(zip(c_head, _cells(r), strict=True)) for r in committed if len(_cells(r)) == len(c_head)]
    page = (ROOT / "docs" / "experiments_e1.md").read_text().splitlines()
    start = next(i for i, line in enumerate(page) if line.startswith("| scenario | method"))
    head = _cells(page[start])
    shared = [h for h in head if h in c_head and h != "scenario"]
    assert {"method", "β", "final π(y3)", "reference π(y3)"} <= set(shared), shared
    n = 0
    for line in page[start + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(head, [c.replace("**", "") for c in _cells(line)], strict=True))
        assert any(all(row[h] == c[h] for h in shared) for c in c_rows), line
        n += 1
    assert n >= 10, n
