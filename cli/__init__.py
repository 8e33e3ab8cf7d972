"""The `vlblocks` command line (typer), installed as vlblocks.cli: parse, call the library, print.
May import: vlblocks.app, vlblocks.data, vlblocks.data.formats, vlblocks.train.
"""
