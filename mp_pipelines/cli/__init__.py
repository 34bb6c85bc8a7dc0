"""The `mp-pipelines` command line."""

from mp_pipelines.cli.main import main

__all__ = ["main"]
