"""`python -m orchestrator.cli`: the `lorafleet` command."""

from orchestrator.cli.commands import app

app()
