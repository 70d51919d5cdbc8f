"""``python -m llmfoundry_pl.plot``: the same as ``lfpl-plot`` (see llmfoundry_pl/cli/plot.py)."""

from llmfoundry_pl.cli.plot import main

if __name__ == "__main__":
    main()
