"""`python -m vlblocks ...` (e.g. under `torchrun`): the same command line as `vlblocks ...`."""

from vlblocks.cli.app import main

if __name__ == "__main__":
    main()
