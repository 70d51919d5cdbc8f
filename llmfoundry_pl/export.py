"""``python -m llmfoundry_pl.export``: the same as ``lfpl-export`` (see llmfoundry_pl/cli/export.py)."""

from llmfoundry_pl.cli.commands import lfpl_export as main

if __name__ == "__main__":
    main()
