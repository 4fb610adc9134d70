"""Regenerate docs/cli.md from the click help texts (the single source): python docs/gen_cli.py"""

import os

import click

from dppa_stream.cli.main import main

HEADER = "# Command-line reference\n\nGenerated from `dppa-stream COMMAND --help` by `docs/gen_cli.py`; do not edit by hand.\n"


def render() -> str:
    parts = [HEADER]
    opts = dict(max_content_width=100, terminal_width=100, help_option_names=["-h", "--help"])
    ctx = click.Context(main, info_name="dppa-stream", **opts)
    parts.append(f"\n## dppa-stream\n\n```\n{main.get_help(ctx)}\n```\n")
    for name in sorted(main.commands):
        cmd = main.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx, **opts)
        parts.append(f"\n## dppa-stream {name}\n\n```\n{cmd.get_help(sub)}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli.md"), "w") as f:
        f.write(render())
