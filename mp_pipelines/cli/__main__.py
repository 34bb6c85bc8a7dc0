"""`python -m mp_pipelines.cli`: the `mp-pipelines` command without the console script."""

from mp_pipelines.cli.main import main

main(prog_name="mp-pipelines")
