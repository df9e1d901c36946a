"""Prompt packs: TOML files of two-step reasoning prompts (data, never code).

A pack file looks like::

    name = "visual_reasoning"
    version = "1.0"
    description = "..."

    [[prompts]]
    id = "extract-relevant-facts"          # unique slug: a-z, 0-9, '-' and '_'
    category = "information_extraction"    # free text, used for grouping in reports
    step1 = "{question}\\nDo not answer yet. First extract ..."
    step2 = "Using the information you extracted, answer.\\n{question}\\n{instruction}"

The two-step method (SDRT paper, section 3.1), as the trace engine runs it in ONE conversation:

* step 1 -- user turn ``[image, render_step1(question, instruction)]``; the model answers ``y1``;
* step 2 -- after the assistant turn ``y1``, the next user turn ``render_step2(question,
  instruction, y1)``; the model answers ``y2``, the final answer, which should follow
  ``{instruction}`` (the dataset's standard answer instruction).

Templates use Python ``{name}`` placeholders; the allowed names are ``question`` (the raw
question), ``instruction`` and ``step1_answer`` (the model's step-1 answer).  Step 1 must contain
``{question}`` and cannot use ``{step1_answer}`` (it does not exist yet).  Literal braces are
written ``{{`` and ``}}``.

Alignment rule: step 2 should end with ``{question}\\n{instruction}``, the text the single-step
student prompt ends with, so that the last positions of both prompts hold the same tokens (the rows
distillation compares).  ``sdrt packs validate`` warns about a prompt that does not
(:func:`alignment_warnings`); ``sdrt distill`` refuses a trace whose prompt endings differ.

``content_hash`` is the sha256 of the canonical JSON of the parsed pack: comments and whitespace
between TOML keys do not change it, any edit of a template (or of name, version, description,
id or category) does.  Trace stores record it, so a store is never reused with an edited pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sdrt_cli.errors import SdrtError, UnknownNameError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PLACEHOLDERS = ("question", "instruction", "step1_answer")
STEP1_PLACEHOLDERS = ("question", "instruction")
TOP_LEVEL_FIELDS = ("name", "version", "description", "prompts")
PROMPT_FIELDS = ("id", "category", "step1", "step2")
SLUG = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


@dataclass(frozen=True)
class Prompt:
    """One two-step prompt: ``step1`` elicits an analysis, ``step2`` asks for the final answer."""

    id: str
    category: str
    step1: str
    step2: str

    def render_step1(self, question: str, instruction: str) -> str:
        """The first user turn's text (the image goes before it in the same turn)."""
        return self.step1.format(question=question, instruction=instruction)

    def render_step2(self, question: str, instruction: str, step1_answer: str) -> str:
        """The second user turn's text, sent after the assistant's step-1 answer."""
        return self.step2.format(question=question, instruction=instruction, step1_answer=step1_answer)

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "category": self.category, "step1": self.step1, "step2": self.step2}


@dataclass
class PromptPack:
    """A validated pack.  ``source`` is the file it was read from."""

    name: str
    version: str
    description: str
    prompts: tuple[Prompt, ...]
    source: str
    content_hash: str

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    @property
    def categories(self) -> list[str]:
        """Distinct categories in first-appearance order."""
        return list(dict.fromkeys(p.category for p in self.prompts))

    def get(self, prompt_id: str) -> Prompt:
        for prompt in self.prompts:
            if prompt.id == prompt_id:
                return prompt
        hint = did_you_mean(prompt_id, self.ids, cutoff=0.5, sentence=True)
        raise UnknownNameError(f"prompt pack {self.name!r} has no prompt {prompt_id!r}; its prompts: {', '.join(self.ids)}.{hint}")

    def select(self, ids_or_count: int | str | Iterable[str] | None = None) -> tuple[Prompt, ...]:
        """The prompts to run: ``None`` = all; an int K (or "K") = the first K, in pack order;
        ids (a list, or one comma-separated string) = those prompts, in the order given."""
        if ids_or_count is None:
            return self.prompts
        if isinstance(ids_or_count, str):
            text = ids_or_count.strip()
            ids_or_count = int(text) if text.isdigit() else [part.strip() for part in text.split(",") if part.strip()]
        if isinstance(ids_or_count, bool):
            raise SdrtError(f"prompt selection must be a count or prompt ids, not {ids_or_count!r}")
        if isinstance(ids_or_count, int):
            count = ids_or_count
            if not 1 <= count <= len(self.prompts):
                raise SdrtError(f"prompt pack {self.name!r} has {len(self.prompts)} prompts; cannot select {count} (choose 1 to {len(self.prompts)})")
            return self.prompts[:count]
        ids = list(ids_or_count)
        if not ids:
            raise SdrtError(f"prompt selection for pack {self.name!r} is empty")
        seen: set[str] = set()
        chosen = []
        for prompt_id in ids:
            if prompt_id in seen:
                raise SdrtError(f"prompt selection for pack {self.name!r} names prompt {prompt_id!r} twice")
            seen.add(prompt_id)
            chosen.append(self.get(prompt_id))
        return tuple(chosen)

    def to_dict(self) -> dict[str, Any]:
        """The parsed content (no source): what ``content_hash`` is computed from."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "prompts": [p.to_dict() for p in self.prompts],
        }


STEP2_ENDING = "{question}\n{instruction}"


def alignment_warnings(pack: PromptPack, prompt_ids: Iterable[str] | None = None) -> list[str]:
    """One line per prompt (of ``prompt_ids``, default all) whose step 2 does not end with
    ``{question}\\n{instruction}``, the ending of the single-step prompt (the student's): its traces'
    last prompt positions would hold other tokens than the student's, and ``sdrt distill`` would
    refuse them."""
    wanted = None if prompt_ids is None else set(prompt_ids)
    return [
        f"prompt pack {pack.source}: prompt {number} ({prompt.id!r}) field 'step2' does not end with "
        f"\"{{question}}\\n{{instruction}}\" as the single-step prompt does, so its traces' last prompt tokens may differ "
        "from the student's, which `sdrt distill` refuses"
        for number, prompt in enumerate(pack.prompts, start=1)
        if not prompt.step2.endswith(STEP2_ENDING) and (wanted is None or prompt.id in wanted)
    ]


def content_hash(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_pack(name_or_path: str | os.PathLike) -> PromptPack:
    """A registered pack by name (``sdrt packs list``), or a pack file by path."""
    from sdrt_cli.plugins import prompt_packs

    if isinstance(name_or_path, os.PathLike):
        return validate_pack_file(name_or_path)
    name = str(name_or_path)
    registry = prompt_packs()
    if name in registry:
        pack = validate_pack_file(registry.get(name))
        if pack.name != name:
            # manifests record pack.name and later reload by it, so the two must agree
            raise SdrtError(f"prompt pack file {pack.source} is registered as {name!r} but its 'name' field is {pack.name!r}; they must match")
        return pack
    if name.endswith(".toml") or os.sep in name or "/" in name or Path(name).is_file():
        return validate_pack_file(name)
    try:
        registry.get(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc} (Or give the path of a .toml pack file.)") from None
    raise AssertionError("unreachable")  # pragma: no cover


def validate_pack_file(path: Any) -> PromptPack:
    """Read and check a pack file; any problem raises ``SdrtError`` naming the file, line and field."""
    source = str(path)
    text = _read_text(path, source)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SdrtError(f"prompt pack {source} is not valid TOML: {exc}") from None
    return _PackChecker(source, text, raw).check()


def _read_text(path: Any, source: str) -> str:
    try:
        if isinstance(path, (str, os.PathLike)):
            return Path(path).read_text(encoding="utf-8")
        return path.read_text(encoding="utf-8")  # an importlib.resources Traversable
    except FileNotFoundError:
        raise SdrtError(f"prompt pack file {source} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SdrtError(f"prompt pack file {source} cannot be read: {exc}") from None


_TOML_TYPE_NAMES = {str: "a string", int: "an integer", float: "a float", bool: "a boolean", list: "an array", dict: "a table"}


def _type_name(value: Any) -> str:
    return _TOML_TYPE_NAMES.get(type(value), type(value).__name__)


class _PackChecker:
    """Schema checks with locations: TOML has no key positions, so lines are found by scanning
    the text for ``[[prompts]]`` headers and ``key =`` lines (known only for that layout)."""

    def __init__(self, source: str, text: str, raw: dict[str, Any]):
        self.source = source
        self.lines = text.splitlines()
        self.raw = raw
        self.prompt_headers = [i + 1 for i, line in enumerate(self.lines) if re.match(r"^\s*\[\[\s*prompts\s*\]\]", line)]

    # -- locations ------------------------------------------------------------------------------
    def _key_line(self, key: str, start: int, end: int) -> int | None:
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for number in range(start, min(end, len(self.lines)) + 1):
            if pattern.match(self.lines[number - 1]):
                return number
        return None

    def _top_line(self, key: str) -> int | None:
        first_table = next((i + 1 for i, line in enumerate(self.lines) if line.lstrip().startswith("[")), len(self.lines) + 1)
        return self._key_line(key, 1, first_table - 1)

    def _prompt_line(self, index: int, key: str | None) -> int | None:
        if len(self.prompt_headers) != len(self.raw.get("prompts", [])) or index >= len(self.prompt_headers):
            return None  # prompts written inline: no reliable line
        start = self.prompt_headers[index]
        following = [i + 1 for i, line in enumerate(self.lines) if i + 1 > start and line.lstrip().startswith("[")]
        end = following[0] - 1 if following else len(self.lines)
        return (self._key_line(key, start + 1, end) if key else None) or start

    def _fail(self, message: str, line: int | None = None, prompt: int | None = None, field: str | None = None):
        where = f"prompt pack {self.source}"
        if line is not None:
            where += f", line {line}"
        subject = ""
        if prompt is not None:
            entry = self.raw["prompts"][prompt]
            prompt_id = entry.get("id") if isinstance(entry, dict) else None
            subject += f"prompt {prompt + 1}" + (f" ({prompt_id!r})" if isinstance(prompt_id, str) else "") + " "
        if field is not None:
            subject += f"field {field!r} "
        raise SdrtError(f"{where}: {subject}{message}")

    # -- checks ---------------------------------------------------------------------------------
    def check(self) -> PromptPack:
        raw = self.raw
        for key in raw:
            if key not in TOP_LEVEL_FIELDS:
                hint = did_you_mean(key, TOP_LEVEL_FIELDS) or f"; allowed: {', '.join(TOP_LEVEL_FIELDS)}"
                self._fail(f"is not a pack field{hint}", line=self._top_line(key), field=key)
        for key in ("name", "version", "description"):
            if key not in raw:
                self._fail("is missing", field=key)
            value = raw[key]
            if not isinstance(value, str):
                self._fail(f"must be a string, not {_type_name(value)}", line=self._top_line(key), field=key)
        if not SLUG.match(raw["name"]):
            self._fail(f"must be a slug (lowercase letters, digits, '-' or '_'), not {raw['name']!r}", line=self._top_line("name"), field="name")
        prompts = raw.get("prompts")
        if prompts is None or prompts == []:
            self._fail("has no prompts; add at least one [[prompts]] table")
        if not isinstance(prompts, list):
            self._fail(f"must be an array of tables ([[prompts]]), not {_type_name(prompts)}", line=self._top_line("prompts"), field="prompts")
        parsed = tuple(self._check_prompt(i, entry) for i, entry in enumerate(prompts))
        seen: dict[str, int] = {}
        for i, prompt in enumerate(parsed):
            if prompt.id in seen:
                self._fail(f"duplicates the id of prompt {seen[prompt.id] + 1}; ids must be unique", line=self._prompt_line(i, "id"), prompt=i, field="id")
            seen[prompt.id] = i
        pack = PromptPack(raw["name"], raw["version"], raw["description"], parsed, self.source, "")
        pack.content_hash = content_hash(pack.to_dict())
        return pack

    def _check_prompt(self, index: int, entry: Any) -> Prompt:
        if not isinstance(entry, dict):
            self._fail(f"must be a table, not {_type_name(entry)}", line=self._top_line("prompts"), prompt=index)
        for key in entry:
            if key not in PROMPT_FIELDS:
                hint = did_you_mean(key, PROMPT_FIELDS) or f"; allowed: {', '.join(PROMPT_FIELDS)}"
                self._fail(f"is not a prompt field{hint}", line=self._prompt_line(index, key), prompt=index, field=key)
        for key in PROMPT_FIELDS:
            if key not in entry:
                self._fail("is missing", line=self._prompt_line(index, None), prompt=index, field=key)
            value = entry[key]
            if not isinstance(value, str):
                self._fail(f"must be a string, not {_type_name(value)}", line=self._prompt_line(index, key), prompt=index, field=key)
            if not value.strip():
                self._fail("is empty", line=self._prompt_line(index, key), prompt=index, field=key)
        if not SLUG.match(entry["id"]):
            self._fail(f"must be a slug (lowercase letters, digits, '-' or '_'), not {entry['id']!r}", line=self._prompt_line(index, "id"), prompt=index, field="id")
        for step, allowed in (("step1", STEP1_PLACEHOLDERS), ("step2", PLACEHOLDERS)):
            used = self._placeholders(index, step, entry[step])
            line = self._prompt_line(index, step)
            for name in used:
                if name == "step1_answer" and step == "step1":
                    self._fail("uses {step1_answer}, which only exists in step 2", line=line, prompt=index, field=step)
                if name not in allowed:
                    allowed_text = ", ".join("{" + n + "}" for n in allowed)
                    self._fail(f"uses unknown placeholder {{{name}}}; allowed: {allowed_text} (write literal braces as {{{{ }}}})", line=line, prompt=index, field=step)
            if step == "step1" and "question" not in used:
                self._fail("must contain the {question} placeholder", line=line, prompt=index, field=step)
        return Prompt(entry["id"], entry["category"], entry["step1"], entry["step2"])

    def _placeholders(self, index: int, step: str, template: str) -> list[str]:
        line = self._prompt_line(index, step)
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            self._fail(f"has unbalanced braces ({exc}); write literal braces as {{{{ and }}}}", line=line, prompt=index, field=step)
        names = []
        for _literal, name, spec, conversion in parts:
            if name is None:
                continue
            if spec or conversion or not name.isidentifier():
                shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                self._fail(f"uses placeholder {shown}; only plain names are allowed, like {{question}}", line=line, prompt=index, field=step)
            names.append(name)
        return names
