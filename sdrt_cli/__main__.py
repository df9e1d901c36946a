"""`python -m sdrt_cli` (and so `torchrun -m sdrt_cli`) runs the CLI."""

from sdrt_cli.cli import main

if __name__ == "__main__":
    main()
