"""A model set: suspects, candidate parents, validated before anything is read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lineage.errors import LineageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
        name = str(d.get("name") or "")
        sus = tuple(_member(name, "suspects", m) for m in (d.get("suspects") or []))
        cand = tuple(_member(name, "candidates", m) for m in (d.get("candidates") or []))
        ms = cls(name, sus, cand, str(d.get("description") or ""))
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
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LineageError(f"model set {set_name}: {role} name {name!r} must be letters, digits, '.', '_' or '-'")
    if not isinstance(source, str) or not source:
        raise LineageError(f"model set {set_name}: {role} {name} has no source")
    base = m.get("base", False)
    if role == "suspects" and base:
        raise LineageError(f"model set {set_name}: suspect {name} cannot be marked base")
    return Member(name, source, bool(base))


def _norm(source: str) -> str:
    if "://" in source:
        return source.rstrip("/")
    return os.path.realpath(os.path.expanduser(source))
