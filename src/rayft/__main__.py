"""`python -m rayft`: the CLI, for job entrypoints on nodes where only `python` is on the PATH."""

from rayft.cli import main

main()
