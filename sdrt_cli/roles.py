"""Role templates of `sdrt calibrate`: what the assessment agent and the augmentor are asked (data,
never code), checked like prompt packs.

A role pack is a TOML file::

    name = "mmdc"                 # a slug
    version = "1.0"
    description = "..."
    [assessor]
    system = "..."                # may be empty
    user = "... {question} ... {answer_1} ... {answer_2} ..."
    [augmentor]
    system = "..."
    user = "... {question} ..."

The assessor must ask for MmDC's verdict sentence ("The scores for Assistant 1 and 2 are X and Y"),
the only format :func:`sdrt_cli.calibration.parse_judge_scores` reads.  Each role's ``system`` text
goes before its ``user`` text in one user turn, after the image: not every backbone's chat template
has a system turn, and the image must stay in the turn that asks about it.
"""

from __future__ import annotations

import dataclasses
import string
from importlib import resources
from pathlib import Path
from typing import Any

from sdrt_cli.config import load_toml
from sdrt_cli.errors import SdrtError, did_you_mean
from sdrt_cli.packs import SLUG, content_hash

ROLES = {
    # role -> (placeholders that must appear in `user`)
    "assessor": ("question", "answer_1", "answer_2"),
    "augmentor": ("question",),
}
TOP_LEVEL_FIELDS = ("name", "version", "description", *ROLES)
ROLE_FIELDS = ("system", "user")
VERDICT_CUE = "The scores for Assistant 1 and 2 are"


@dataclasses.dataclass(frozen=True)
class RoleTemplate:
    system: str
    user: str

    def render(self, **values: str) -> str:
        text = self.user.format(**values)
        return f"{self.system}\n{text}" if self.system.strip() else text


@dataclasses.dataclass(frozen=True)
class RolePack:
    name: str
    version: str
    description: str
    assessor: RoleTemplate
    augmentor: RoleTemplate
    source: str
    content_hash: str


def builtin_role_packs() -> dict[str, Any]:
    folder = resources.files("sdrt_cli") / "role_packs"
    return {item.name[: -len(".toml")]: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".toml")}


def load_role_pack(name_or_path: str | Path) -> RolePack:
    """A shipped role pack by name (``mmdc``) or a role pack file by path."""
    packs = builtin_role_packs()
    if str(name_or_path) in packs:
        return validate_role_pack(packs[str(name_or_path)], f"role pack {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = did_you_mean(str(name_or_path), sorted(packs))
        raise SdrtError(f"role pack {name_or_path!r} is neither a shipped role pack ({', '.join(sorted(packs))}) nor an existing file{hint}")
    return validate_role_pack(path, f"role pack {path}")


def validate_role_pack(path: Path, where: str) -> RolePack:
    """Read and check a role pack; any problem is one sentence naming the file and the field."""
    raw = load_toml(path, "role pack")
    for key in raw:
        if key not in TOP_LEVEL_FIELDS:
            raise SdrtError(f"{where}: {key!r} is not a field; fields are {', '.join(TOP_LEVEL_FIELDS)}")
    for key in ("name", "version", "description", *ROLES):
        if key not in raw:
            raise SdrtError(f"{where}: field {key!r} is missing")
    for key in ("name", "version", "description"):
        if not isinstance(raw[key], str):
            raise SdrtError(f"{where}: field {key!r} must be a string")
    if not SLUG.match(raw["name"]):
        raise SdrtError(f"{where}: field 'name' must be a slug (lowercase letters, digits, '-' or '_'), not {raw['name']!r}")
    templates = {role: _check_role(where, role, raw[role]) for role in ROLES}
    if VERDICT_CUE.lower() not in templates["assessor"].user.lower():
        raise SdrtError(f"{where}: field 'assessor.user' must ask for the verdict as {VERDICT_CUE!r} X and Y (the only format sdrt reads)")
    canonical = {k: raw[k] for k in TOP_LEVEL_FIELDS}
    return RolePack(raw["name"], raw["version"], raw["description"], templates["assessor"], templates["augmentor"], str(path), content_hash(canonical))


def _check_role(where: str, role: str, table: Any) -> RoleTemplate:
    if not isinstance(table, dict):
        raise SdrtError(f"{where}: {role!r} must be a table ([{role}]) with fields {', '.join(ROLE_FIELDS)}")
    for key in table:
        if key not in ROLE_FIELDS:
            raise SdrtError(f"{where}: {role}.{key} is not a field; fields are {', '.join(ROLE_FIELDS)}")
    for key in ROLE_FIELDS:
        if not isinstance(table.get(key), str):
            raise SdrtError(f"{where}: field '{role}.{key}' is missing or not a string")
    if not table["user"].strip():
        raise SdrtError(f"{where}: field '{role}.user' is empty")
    required = ROLES[role]
    for key in ROLE_FIELDS:
        try:
            used = [name for _, name, _, _ in string.Formatter().parse(table[key]) if name is not None]
        except ValueError as exc:
            raise SdrtError(f"{where}: field '{role}.{key}' has unbalanced braces ({exc}); write literal braces as {{{{ and }}}}") from None
        for name in used:
            if name not in required or key == "system":
                allowed = ", ".join("{" + n + "}" for n in required)
                raise SdrtError(f"{where}: field '{role}.{key}' uses placeholder {{{name}}}; {role}.user may use {allowed}, {role}.system none")
        if key == "user":
            for name in required:
                if name not in used:
                    raise SdrtError(f"{where}: field '{role}.user' must contain the {{{name}}} placeholder")
    return RoleTemplate(system=table["system"], user=table["user"])
