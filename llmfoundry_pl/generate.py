"""``python -m llmfoundry_pl.generate``: the same as ``lfpl-generate`` (see llmfoundry_pl/cli/generate.py)."""

from llmfoundry_pl.cli.commands import lfpl_generate as main

if __name__ == "__main__":
    main()
