"""Prompt packs: the shipped packs, every validation error, rendering, selection, the CLI and the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sdrt_cli.errors import SdrtError, UnknownNameError
from sdrt_cli.hookspecs import hookimpl
from sdrt_cli.packs import PLACEHOLDERS, Prompt, load_pack, validate_pack_file
from sdrt_cli.plugins import prompt_packs

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("information_extraction", "automatic_planning", "text_layout_analysis", "visual_concept_alignment")

GOOD_PACK = '''\
name = "tiny"
version = "0.1"
description = "two prompts"

[[prompts]]
id = "first"
category = "information_extraction"
step1 = "{question}\\nList the numbers."
step2 = "Now answer.\\n{question}\\n{instruction}"

[[prompts]]
id = "second"
category = "automatic_planning"
step1 = "Plan first. {question} ({instruction})"
step2 = "You said: {step1_answer}. Answer {{briefly}}.\\n{instruction}"
'''


def write(tmp_path: Path, text: str, name: str = "pack.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- shipped packs ------------------------------------------------------------------------------

def test_every_registered_pack_loads_validates_and_renders():
    names = prompt_packs().names()
    assert "visual_reasoning" in names
    for name in names:
        pack = load_pack(name)
        assert pack.name == name
        assert validate_pack_file(prompt_packs().get(name)).content_hash == pack.content_hash
        assert len(pack.prompts) >= 1 and len(set(pack.ids)) == len(pack.ids)
        for prompt in pack.prompts:
            step1 = prompt.render_step1("Q?", "INSTR.")
            step2 = prompt.render_step2("Q?", "INSTR.", "Y1")
            assert "Q?" in step1
            assert step2.strip()


def test_visual_reasoning_pack_covers_the_four_families_in_ensemble_order():
    pack = load_pack("visual_reasoning")
    assert len(pack.prompts) >= 8
    categories = [p.category for p in pack.prompts]
    assert set(categories) == set(FAMILIES)
    assert all(categories.count(family) >= 2 for family in FAMILIES)
    # the K = 4 ensemble is the first four prompts: one per family; K = 8 then has two per family
    assert set(categories[:4]) == set(FAMILIES)
    assert all(categories[:8].count(family) == 2 for family in FAMILIES)


def test_visual_reasoning_templates_share_the_question_prefix_and_the_instruction_suffix():
    pack = load_pack("visual_reasoning")
    for prompt in pack.prompts:
        # question first: the image+question prefix (and its KV cache) is shared by all prompts
        assert prompt.step1.startswith("{question}\n"), prompt.id
        assert "{step1_answer}" not in prompt.step1
        # the student's single-step prompt is "{question}\n{instruction}": same final tokens
        assert prompt.step2.endswith("\n{question}\n{instruction}"), prompt.id
        assert "Do not answer yet" in prompt.step1, "step 1 elicits analysis, not the answer"


# -- rendering ----------------------------------------------------------------------------------

def test_render_substitutes_placeholders_and_keeps_literal_braces(tmp_path):
    pack = validate_pack_file(write(tmp_path, GOOD_PACK))
    first, second = pack.prompts
    assert first.render_step1("How tall is {x}?", "Be brief.") == "How tall is {x}?\nList the numbers."
    assert first.render_step2("Q", "Be brief.", "ignored") == "Now answer.\nQ\nBe brief."
    # question-not-first order works too, and {{ }} renders as literal braces
    assert second.render_step1("Q", "I.") == "Plan first. Q (I.)"
    assert second.render_step2("Q", "I.", "it is 3") == "You said: it is 3. Answer {briefly}.\nI."


def test_prompt_is_frozen_and_exposes_its_fields():
    prompt = Prompt("p", "c", "{question}", "{instruction}")
    with pytest.raises(AttributeError):
        prompt.id = "other"  # type: ignore[misc]
    assert prompt.render_step2("q", "i", "a") == "i"
    assert PLACEHOLDERS == ("question", "instruction", "step1_answer")


# -- content hash -------------------------------------------------------------------------------

def test_content_hash_ignores_comments_and_whitespace_but_not_template_edits(tmp_path):
    base = validate_pack_file(write(tmp_path, GOOD_PACK, "a.toml"))
    reformatted = "# a comment\n\n" + GOOD_PACK.replace('id = "first"', 'id   =   "first"   # trailing comment').replace("\n[[prompts]]", "\n\n\n[[prompts]]")
    assert validate_pack_file(write(tmp_path, reformatted, "b.toml")).content_hash == base.content_hash
    edited = GOOD_PACK.replace("List the numbers.", "List the numbers!")
    assert validate_pack_file(write(tmp_path, edited, "c.toml")).content_hash != base.content_hash
    assert len(base.content_hash) == 64 and base.source == str(tmp_path / "a.toml")


# -- get / select -------------------------------------------------------------------------------

def test_get_and_select(tmp_path):
    pack = validate_pack_file(write(tmp_path, GOOD_PACK))
    assert pack.get("second").id == "second"
    with pytest.raises(UnknownNameError, match=r"has no prompt 'secnd'.*Did you mean 'second'\?"):
        pack.get("secnd")
    assert pack.select(None) == pack.prompts
    assert [p.id for p in pack.select(1)] == ["first"]
    assert [p.id for p in pack.select("2")] == ["first", "second"]
    assert [p.id for p in pack.select(["second", "first"])] == ["second", "first"]
    assert [p.id for p in pack.select("second, first")] == ["second", "first"]


@pytest.mark.parametrize(
    "selection, message",
    [
        (0, "cannot select 0"),
        (3, "has 2 prompts; cannot select 3"),
        (True, "must be a count or prompt ids"),
        ([], "is empty"),
        (["first", "first"], "names prompt 'first' twice"),
        (["third"], "has no prompt 'third'"),
    ],
)
def test_select_rejects_bad_selections(tmp_path, selection, message):
    pack = validate_pack_file(write(tmp_path, GOOD_PACK))
    with pytest.raises(SdrtError, match=message):
        pack.select(selection)


# -- load_pack ----------------------------------------------------------------------------------

def test_load_pack_by_path_str_and_path(tmp_path):
    path = write(tmp_path, GOOD_PACK)
    assert load_pack(str(path)).name == "tiny"
    assert load_pack(path).ids == ["first", "second"]


def test_load_pack_unknown_name_suggests_registered_pack():
    with pytest.raises(UnknownNameError) as info:
        load_pack("visual_reasonin")
    message = str(info.value)
    assert "unknown prompt pack 'visual_reasonin'" in message and "Did you mean 'visual_reasoning'?" in message


def test_pack_from_a_plugin_is_listed_and_loadable(tmp_path, plugin, cli):
    path = write(tmp_path, GOOD_PACK, "tiny.toml")

    class PackPlugin:
        @staticmethod
        @hookimpl
        def register_prompt_packs(register):
            register("tiny", str(path))

    plugin(PackPlugin, "tiny-pack-plugin")
    assert load_pack("tiny").source == str(path)
    result = cli("packs", "list")
    assert result.exit_code == 0, result.output
    assert "tiny" in result.out and "tiny-pack-plugin" in result.out and "visual_reasoning" in result.out


def test_registered_name_must_match_the_packs_name_field(tmp_path, plugin):
    path = write(tmp_path, GOOD_PACK, "tiny.toml")

    class MisnamedPackPlugin:
        @staticmethod
        @hookimpl
        def register_prompt_packs(register):
            register("other-name", str(path))

    plugin(MisnamedPackPlugin, "misnamed-pack-plugin")
    with pytest.raises(SdrtError, match=r"registered as 'other-name' but its 'name' field is 'tiny'"):
        load_pack("other-name")


def test_packs_list_reports_an_invalid_plugin_pack_and_fails(tmp_path, plugin, cli):
    path = write(tmp_path, GOOD_PACK.replace('version = "0.1"\n', ""), "broken.toml")

    class BrokenPackPlugin:
        @staticmethod
        @hookimpl
        def register_prompt_packs(register):
            register("broken", str(path))

    plugin(BrokenPackPlugin, "broken-pack-plugin")
    result = cli("packs", "list")
    assert result.exit_code == 1
    assert "visual_reasoning" in result.out, "the valid packs are still listed"
    assert "broken.toml" in result.err and "'version' is missing" in result.err
    listed = cli("packs", "list", "--json")
    row = next(r for r in json.loads(listed.out) if r["name"] == "broken")
    assert row["prompts"] == 0 and "invalid:" in row["source"] and "'version' is missing" in row["source"]  # why it has 0 prompts


# -- validation errors: every bad input, through the API and through the CLI --------------------

def _replace(old: str, new: str) -> str:
    assert old in GOOD_PACK
    return GOOD_PACK.replace(old, new, 1)


BAD_PACKS = {
    # case id: (file text, fragments the one-sentence error must contain)
    "malformed-toml": (_replace('version = "0.1"', "version = "), ["not valid TOML", "line 2"]),
    "missing-top-field": (_replace('description = "two prompts"\n', ""), ["field 'description' is missing"]),
    "extra-top-field": (_replace('description = "two prompts"', 'description = "two prompts"\ndescripton = "typo"'), ["line 4", "field 'descripton' is not a pack field; did you mean 'description'?"]),
    "wrong-type-top-field": (_replace('version = "0.1"', "version = 1"), ["line 2", "field 'version' must be a string, not an integer"]),
    "bad-pack-name": (_replace('name = "tiny"', 'name = "Tiny Pack"'), ["line 1", "field 'name' must be a slug", "not 'Tiny Pack'"]),
    "no-prompts": (GOOD_PACK.split("[[prompts]]")[0], ["has no prompts"]),
    "empty-prompts-array": (GOOD_PACK.split("[[prompts]]")[0] + "prompts = []\n", ["has no prompts"]),
    "prompts-not-tables": (GOOD_PACK.split("[[prompts]]")[0] + 'prompts = "all of them"\n', ["field 'prompts' must be an array of tables", "not a string"]),
    "prompt-not-a-table": (GOOD_PACK.split("[[prompts]]")[0] + 'prompts = ["just text"]\n', ["prompt 1", "must be a table"]),
    "missing-prompt-field": (_replace('step2 = "Now answer.\\n{question}\\n{instruction}"\n', ""), ["line 5", "prompt 1 ('first') field 'step2' is missing"]),
    "extra-prompt-field": (_replace('id = "first"', 'id = "first"\nstepp1 = "x"'), ["line 7", "prompt 1 ('first') field 'stepp1' is not a prompt field; did you mean 'step1'?"]),
    "wrong-type-prompt-field": (_replace('category = "information_extraction"', "category = 3"), ["line 7", "field 'category' must be a string, not an integer"]),
    "empty-template": (_replace('step2 = "Now answer.\\n{question}\\n{instruction}"', 'step2 = "   "'), ["line 9", "prompt 1 ('first') field 'step2' is empty"]),
    "bad-prompt-id": (_replace('id = "first"', 'id = "First prompt"'), ["line 6", "field 'id' must be a slug", "not 'First prompt'"]),
    "duplicate-id": (_replace('id = "second"', 'id = "first"'), ["line 12", "prompt 2 ('first') field 'id' duplicates the id of prompt 1"]),
    "unknown-placeholder": (_replace("Now answer.", "Now {answer}."), ["line 9", "field 'step2' uses unknown placeholder {answer}", "{question}, {instruction}, {step1_answer}"]),
    "step1-without-question": (_replace("{question}\\nList the numbers.", "List the numbers."), ["line 8", "field 'step1' must contain the {question} placeholder"]),
    "step1-uses-step1-answer": (_replace("{question}\\nList the numbers.", "{question} {step1_answer}"), ["line 8", "field 'step1' uses {step1_answer}"]),
    "unbalanced-brace": (_replace("Now answer.", "Now { answer."), ["line 9", "field 'step2' has unbalanced braces"]),
    "format-spec-placeholder": (_replace("Now answer.", "Now {question!r}."), ["line 9", "field 'step2' uses placeholder {question!r}; only plain names"]),
    "positional-placeholder": (_replace("Now answer.", "Now {}."), ["line 9", "field 'step2' uses placeholder {}"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PACKS))
def test_bad_pack_is_rejected_naming_file_line_and_field(tmp_path, case):
    text, fragments = BAD_PACKS[case]
    path = write(tmp_path, text, f"{case}.toml")
    with pytest.raises(SdrtError) as info:
        validate_pack_file(path)
    message = str(info.value)
    assert message.startswith(f"prompt pack {path}"), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(BAD_PACKS))
def test_cli_validate_fails_on_bad_pack_with_one_line(tmp_path, cli, case):
    text, fragments = BAD_PACKS[case]
    path = write(tmp_path, text, f"{case}.toml")
    result = cli("packs", "validate", path)
    assert result.exit_code == 1
    err = " ".join(result.err.split())  # Rich may wrap long lines
    assert f"{case}.toml" in err and fragments[-1] in err and "Traceback" not in result.err


def test_missing_and_unreadable_pack_files(tmp_path, cli):
    with pytest.raises(SdrtError, match=r"prompt pack file .*absent\.toml does not exist"):
        validate_pack_file(tmp_path / "absent.toml")
    with pytest.raises(SdrtError, match=r"cannot be read"):
        validate_pack_file(tmp_path)  # a directory
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(SdrtError, match=r"latin1\.toml cannot be read"):
        validate_pack_file(tmp_path / "latin1.toml")
    result = cli("packs", "validate", tmp_path / "absent.toml")
    assert result.exit_code == 1 and "absent.toml does not exist" in result.err


def test_pack_written_with_inline_prompts_validates_without_line_numbers(tmp_path):
    text = 'name = "inline"\nversion = "1"\ndescription = "d"\nprompts = [{id = "a", category = "c", step1 = "{question}", step2 = "{bad}"}]\n'
    with pytest.raises(SdrtError) as info:
        validate_pack_file(write(tmp_path, text))
    assert "prompt 1 ('a') field 'step2' uses unknown placeholder {bad}" in str(info.value)


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_validate_ok_lines_and_mixed_results(tmp_path, cli):
    good = write(tmp_path, GOOD_PACK, "good.toml")
    shipped = REPO / "prompt_packs" / "visual_reasoning.toml"
    result = cli("packs", "validate", good, shipped)
    assert result.exit_code == 0, result.output
    assert f"ok  {good}: pack 'tiny' version 0.1, 2 prompts" in result.out
    assert "pack 'visual_reasoning'" in result.out

    bad = write(tmp_path, BAD_PACKS["duplicate-id"][0], "bad.toml")
    result = cli("packs", "validate", good, bad)
    assert result.exit_code == 1
    assert f"ok  {good}" in result.out and "bad.toml" in result.err and "field 'id'" in result.err


def test_cli_packs_list_table(cli):
    result = cli("packs", "list")
    assert result.exit_code == 0, result.output
    pack = load_pack("visual_reasoning")
    row = next(line for line in result.out.splitlines() if "visual_reasoning" in line)
    assert pack.version in row and f" {len(pack.prompts)} " in row and "information_extraction" in row
    for header in ("name", "version", "#prompts", "categories", "source"):
        assert header in result.out


def test_cli_packs_list_json(cli):
    import json

    result = cli("packs", "list", "--json")
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert rows["visual_reasoning"]["prompts"] == len(load_pack("visual_reasoning").prompts)
    assert set(rows["visual_reasoning"]["categories"]) == set(FAMILIES)


def test_cli_show_by_name_and_path_and_rendered(tmp_path, cli):
    result = cli("packs", "show", "visual_reasoning")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.out.split())
    for prompt in load_pack("visual_reasoning").prompts:
        assert prompt.id in flat
        assert " ".join(prompt.step2.split()) in flat
    assert load_pack("visual_reasoning").content_hash in result.out

    path = write(tmp_path, GOOD_PACK)
    result = cli("packs", "show", path, "--question", "What is [bold]x[/bold]?", "--instruction", "One word.")
    assert result.exit_code == 0, result.output
    # rendered with the question verbatim (brackets are not Rich markup) and the step-1 stand-in
    assert "Plan first. What is [bold]x[/bold]? (One word.)" in result.out
    assert "You said: <step-1 answer>. Answer {briefly}." in result.out


def test_cli_show_unknown_pack_fails_with_suggestion(cli):
    result = cli("packs", "show", "visual-reasoning")
    assert result.exit_code == 1
    assert "Did you mean 'visual_reasoning'?" in result.err


def test_cli_packs_help_teaches_the_format(cli):
    result = cli("packs", "--help")
    assert result.exit_code == 0
    for word in ("{question}", "{instruction}", "{step1_answer}", "step1", "step2", "TOML"):
        assert word in result.out


# -- packaging ----------------------------------------------------------------------------------

def test_wheel_build_ships_prompt_packs_and_plugins(tmp_path):
    """Builds the real wheel (a few seconds) and checks the shipped packs are inside it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    # build from a copy: an in-tree build would write build/ into the shared work tree
    source = tmp_path / "src"
    source.mkdir()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for item in REPO.iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, source / item.name)
    for directory in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(REPO / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    # --no-build-isolation: use the venv's setuptools instead of downloading one
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("sdrt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = sorted((REPO / "prompt_packs").glob("*.toml"))
        assert shipped, "the repository ships at least one pack"
        for pack_file in shipped:
            member = f"sdrt_prompt_packs/{pack_file.name}"
            assert member in names, f"{member} missing from {wheel.name}"
            assert archive.read(member) == pack_file.read_bytes()
        assert "sdrt_plugins/datasets/synthetic_charts.py" in names
        assert "sdrt_plugins/packs.py" in names
        assert not any(name.startswith("plugins/") for name in names), "plugins must install as sdrt_plugins"
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "packs = sdrt_plugins.packs" in archive.read(entry_points).decode()
