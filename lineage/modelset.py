"""A model set: suspects, candidate parents, validated before anything is read.

Names become file and folder names (`verdicts/NAME.json`, the Parquet
partition `suspect=NAME`, the default `outputs/MODEL_SET`), so every name,
the model set's own included, is checked here, in one place: letters,
digits, '.', '_' and '-', starting with a letter or digit, at most
MAX_NAME characters. No path separator, no `..` of its own, no control
character, nothing a file system refuses for length.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lineage.errors import LineageError, printable

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
        unknown = set(d) - {"name", "suspects", "candidates", "description"}
        if unknown:
            raise LineageError(
                f"model set {d.get('name')}: unknown keys {sorted(unknown)} (known: name, suspects, candidates, description)"
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


def _member(set_name: str, role: str, m: object) -> Member:
    if not isinstance(m, dict):
        raise LineageError(f"model set {set_name}: each of {role} must be a mapping with name and source, got {m!r}")
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
