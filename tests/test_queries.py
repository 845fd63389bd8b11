"""The README's DuckDB and Polars queries, run as written on a bulk audit's output."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from lineage.audit import run_local
from lineage.modelset import ModelSet
from tests.common import modelset
from tests.test_bulk import uploads  # noqa: F401 - the fixture

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(lang: str) -> list[str]:
    text = README.read_text()
    section = text[text.index("## Bulk audits") :]
    section = section[: section.index("\n## ", 5)]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def out(uploads, tmp_path_factory):  # noqa: F811
    sus, pool = uploads
    o = tmp_path_factory.mktemp("queries") / "out"
    run_local(ModelSet.from_dict(modelset(sus, pool)), o)
    return o


def test_duckdb_queries_answer_the_questions(out):
    (sql,) = blocks("sql")
    statements = [s.strip() for s in sql.replace("OUT", str(out)).split(";") if s.strip()]
    assert len(statements) == 4
    con = duckdb.connect()
    blends, deviating, copies, inconclusive = (con.execute(s).fetchall() for s in statements)
    assert [s for s, _ in blends] == ["mix"]
    assert deviating == []  # every blend here has constant weights
    assert ("ft", "ft-reupload") in copies
    assert all(reason for _, reason in inconclusive)


def test_polars_queries_answer_the_questions(out):
    (code,) = blocks("python")
    ns: dict = {}
    exec(code.replace("OUT", str(out)), ns)
    assert ns["blends"]["suspect"].to_list() == ["mix"]
    assert ("ft", "ft-reupload") in list(zip(ns["copies"]["suspect"], ns["copies"]["other"]))
    mix = ns["per_layer"].filter((ns["per_layer"]["suspect"] == "mix") & (ns["per_layer"]["candidate"] == "other"))
    assert len(mix) == 3 and all(abs(w - 0.4) < 0.01 for w in mix["weight"])
