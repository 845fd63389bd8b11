"""A model set: suspects, candidate parents, validated before anything is read.

Names become file and folder names (`verdicts/NAME.json`, the Parquet
partition `suspect=NAME`, the default `outputs/MODEL_SET`), so every name,
the model set's own included, is checked here, in one place: letters,
digits, '.', '_' and '-', starting with a letter or digit, at most
MAX_NAME characters. No path separator, no `..` of its own, no control
character, nothing a file system refuses for length.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field

from lineage.errors import LineageError, printable
from lineage.files import MAX_LIST_BYTES, read_small

MAX_NAME = 100
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(what: str, name: object) -> str:
    """`name` if it is a safe file name (see module docstring); LineageError otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LineageError(
            f"{what} name {printable(repr(name))} must be letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if len(name) > MAX_NAME:
        raise LineageError(f"{what} name {name[:20]}... is {len(name)} characters long; the limit is {MAX_NAME}")
    return name


@dataclass(frozen=True)
class Member:
    name: str
    source: str
    base: bool = False


@dataclass(frozen=True)
class ModelSet:
    name: str
    suspects: tuple[Member, ...]
    candidates: tuple[Member, ...]
    description: str = field(default="", compare=False)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSet:
        """Build and validate from plain data (a Hydra config turned to a dict)."""
        if not isinstance(d, dict):
            raise LineageError(f"model set: expected a mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "suspects", "suspects_from", "candidates", "description"}
        if unknown:
            raise LineageError(
                f"model set {d.get('name')}: unknown keys {sorted(unknown)} (known: name, suspects, suspects_from, candidates, description)"
            )
        name = check_name("model set", d.get("name"))
        members = {}
        for role in ("suspects", "candidates"):
            ms_ = d.get(role)
            if ms_ is None:
                ms_ = []
            if not isinstance(ms_, (list, tuple)):
                raise LineageError(
                    f"model set {name}: {role} must be a list of {{name, source}} entries, got {type(ms_).__name__}"
                )
            members[role] = tuple(_member(name, role, m) for m in ms_)
        if d.get("suspects_from") is not None:
            listed = read_members(d["suspects_from"], name)
            members["suspects"] = members["suspects"] + tuple(_member(name, "suspects", m) for m in listed)
        desc = d.get("description")
        if desc is not None and not isinstance(desc, str):
            raise LineageError(f"model set {name}: description must be text, got {type(desc).__name__}")
        ms = cls(name, members["suspects"], members["candidates"], desc or "")
        ms.validate()
        return ms

    def validate(self) -> None:
        if not self.suspects:
            raise LineageError(f"model set {self.name}: no suspects")
        if not self.candidates:
            raise LineageError(f"model set {self.name}: empty candidate list; name at least one possible parent")
        seen: dict[str, str] = {}
        for role, ms in (("suspect", self.suspects), ("candidate", self.candidates)):
            for m in ms:
                if m.name in seen:
                    raise LineageError(f"model set {self.name}: duplicate name {m.name!r} ({seen[m.name]} and {role})")
                seen[m.name] = role
        cand_src = {_norm(c.source): c.name for c in self.candidates}
        for s in self.suspects:
            if _norm(s.source) in cand_src:
                raise LineageError(
                    f"model set {self.name}: suspect {s.name} is also candidate {cand_src[_norm(s.source)]} ({s.source}); a model cannot be its own parent"
                )
        bases = [c.name for c in self.candidates if c.base]
        if len(bases) > 1:
            raise LineageError(f"model set {self.name}: several candidates marked base: {bases}; mark one")

    @property
    def base(self) -> str | None:
        return next((c.name for c in self.candidates if c.base), None)


def read_members(path: object, set_name: str) -> list[dict]:
    """`{name, source}` rows of a list of uploads: a CSV (with or without a `name,source`
    header), a Parquet file (columns `name` and `source`), or a text file of one
    `name,source` (or `name source`) per line, `#` comments and blank lines skipped.
    Read as hostile input: a regular file, capped in size; each row's problems name the
    file and line."""
    if not isinstance(path, str) or not path:
        raise LineageError(f"model set {set_name}: suspects_from must name a file, got {path!r}")
    raw = read_small(os.path.expanduser(path), MAX_LIST_BYTES, "suspects_from list")
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(pa.BufferReader(raw))
        except (pa.ArrowException, OSError) as e:
            raise LineageError(f"{path}: not a readable Parquet file ({e})") from None
        if not {"name", "source"} <= set(t.column_names):
            raise LineageError(f"{path}: needs columns name and source, has {t.column_names}")
        return [{"name": r["name"], "source": r["source"]} for r in t.select(["name", "source"]).to_pylist()]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = next(csv.reader([line])) if "," in line else line.split()
        parts = [p.strip() for p in parts]
        if i == 1 and [p.lower() for p in parts[:2]] == ["name", "source"]:
            continue  # a CSV header
        if len(parts) != 2 or not all(parts):
            raise LineageError(f"{path}:{i}: expected name,source; got {printable(line[:200])}")
        out.append({"name": parts[0], "source": parts[1], "_where": f"{path}:{i}"})
    return out


def _member(set_name: str, role: str, m: object) -> Member:
    if not isinstance(m, dict):
        raise LineageError(f"model set {set_name}: each of {role} must be a mapping with name and source, got {m!r}")
    if "_where" in m:  # a row of a suspects_from list: its problems name the file and line
        m = dict(m)
        at = m.pop("_where")
        try:
            return _member(set_name, role, m)
        except LineageError as e:
            raise LineageError(f"{at}: {e}") from None
    unknown = set(m) - {"name", "source", "base"}
    if unknown:
        raise LineageError(
            f"model set {set_name}: {role} entry {m.get('name')!r} has unknown keys {sorted(unknown)} (known: name, source, base)"
        )
    name, source = m.get("name"), m.get("source")
    check_name(f"model set {set_name}: {role[:-1]}", name)
    if not isinstance(source, str) or not source:
        raise LineageError(f"model set {set_name}: {role} {name} has no source")
    if not source.isprintable():
        raise LineageError(f"model set {set_name}: {role} {name} has a source with control characters: {printable(source)}")
    base = m.get("base", False)
    if not isinstance(base, bool):
        raise LineageError(f"model set {set_name}: {role} {name}: base must be true or false, got {base!r}")
    if role == "suspects" and base:
        raise LineageError(f"model set {set_name}: suspect {name} cannot be marked base")
    return Member(name, source, bool(base))


def _norm(source: str) -> str:
    if "://" in source:
        return source.rstrip("/")
    return os.path.realpath(os.path.expanduser(source))
