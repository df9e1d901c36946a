"""``sdrt packs``: list, show and validate prompt packs."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from sdrt_cli.errors import SdrtError

HELP = """Prompt packs: the two-step reasoning prompts that [bold]sdrt traces[/] runs on every example.

A pack is a TOML file (data, never code) with [bold]name[/], [bold]version[/], [bold]description[/] and a list of
[bold]\\[\\[prompts]][/] tables, each with [bold]id[/] (a unique slug), [bold]category[/], [bold]step1[/] and [bold]step2[/].
Step 1 is sent with the image and asks for an analysis; step 2 is the next user turn of the same
conversation, after the model's step-1 answer, and asks for the final answer.

Placeholders (Python [bold]{name}[/] syntax): [bold]{question}[/] the raw question, [bold]{instruction}[/] the
dataset's answer instruction (e.g. "Answer the question using a single word or phrase."),
[bold]{step1_answer}[/] the model's step-1 answer (step 2 only).  Step 1 must contain [bold]{question}[/].
Write literal braces as [bold]{{[/] and [bold]}}[/].  Plugins ship packs through the
[bold]register_prompt_packs[/] hook; any command taking a pack also accepts a path to a .toml file.
"""

SAMPLE_INSTRUCTION = "Answer the question using a single word or phrase."


def register(app: typer.Typer) -> None:
    packs_app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode="rich")

    @packs_app.command("list")
    def list_command(
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List every registered prompt pack (built-in and from plugins)."""
        from sdrt_cli.packs import load_pack
        from sdrt_cli.plugins import prompt_packs

        rows, errors = [], []
        for entry in prompt_packs().entries():
            try:
                pack = load_pack(entry.name)
            except SdrtError as exc:
                # keep listing the good packs; the broken one is reported and fails the command
                errors.append(str(exc))
                rows.append({"name": entry.name, "version": "-", "prompts": 0, "categories": [], "source": f"{entry.value} (invalid: {exc})", "plugin": entry.plugin})
                continue
            rows.append({"name": pack.name, "version": pack.version, "prompts": len(pack.prompts), "categories": pack.categories, "source": pack.source, "plugin": entry.plugin})
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            table = Table(title="sdrt prompt packs")
            for column in ("name", "version", "#prompts", "categories", "source"):
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(row["name"], row["version"], str(row["prompts"]), ", ".join(row["categories"]) or "-", f"{row['source']}\n(plugin: {row['plugin']})")
            Console().print(table)
        if errors:
            raise SdrtError(errors[0] if len(errors) == 1 else f"{len(errors)} prompt packs are invalid; first: {errors[0]}")

    @packs_app.command("show")
    def show_command(
        pack_name: str = typer.Argument(..., metavar="NAME|PATH", help="A registered pack name or a path to a .toml pack file."),
        question: str = typer.Option(None, "--question", help="Also show both turns rendered for this question (step-1 answer shown as <step-1 answer>)."),
        instruction: str = typer.Option(SAMPLE_INSTRUCTION, "--instruction", help="The instruction used with --question."),
    ) -> None:
        """Show a pack's metadata and every prompt's step-1 and step-2 templates."""
        from sdrt_cli.packs import load_pack

        pack = load_pack(pack_name)
        console = Console()
        console.print(Text.assemble((pack.name, "bold"), f"  version {pack.version}  ({len(pack.prompts)} prompts)"))
        console.print(Text(pack.description))
        console.print(Text(f"source: {pack.source}\ncontent hash: {pack.content_hash}", style="dim"))
        for number, prompt in enumerate(pack.prompts, start=1):
            console.print()
            console.print(Text.assemble((f"{number}. {prompt.id}", "bold cyan"), f"  [{prompt.category}]"))
            # templates are shown as plain Text so brackets in them are never read as Rich markup
            step1, step2 = prompt.step1, prompt.step2
            if question is not None:
                step1 = prompt.render_step1(question, instruction)
                step2 = prompt.render_step2(question, instruction, "<step-1 answer>")
            console.print(Text("step 1:", style="bold"))
            console.print(Padding(Text(step1), (0, 0, 0, 4)))
            console.print(Text("step 2:", style="bold"))
            console.print(Padding(Text(step2), (0, 0, 0, 4)))

    @packs_app.command("validate")
    def validate_command(
        files: list[str] = typer.Argument(..., metavar="FILE...", help="Prompt pack .toml files to check."),
    ) -> None:
        """Check pack files: TOML syntax, fields and types, unique ids, allowed placeholders; warn when a
        prompt's step 2 does not end with "{question}\\n{instruction}" as the single-step prompt does."""
        from sdrt_cli.packs import alignment_warnings, validate_pack_file

        err_console = Console(stderr=True)
        failed = 0
        for path in files:
            try:
                pack = validate_pack_file(path)
            except SdrtError as exc:
                failed += 1
                err_console.print(Text.assemble(("Error: ", "bold red"), str(exc)), soft_wrap=True)
                continue
            for warning in alignment_warnings(pack):
                err_console.print(Text.assemble(("Warning: ", "bold yellow"), warning), soft_wrap=True)
            typer.echo(f"ok  {path}: pack {pack.name!r} version {pack.version}, {len(pack.prompts)} prompts, content hash {pack.content_hash[:12]}")
        if failed:
            raise typer.Exit(1)

    app.add_typer(packs_app, name="packs")

