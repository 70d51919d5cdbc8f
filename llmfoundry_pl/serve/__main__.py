"""``python -m llmfoundry_pl.serve``: the same as ``lfpl-serve`` (see llmfoundry_pl/cli/serve.py)."""

from llmfoundry_pl.cli.commands import lfpl_serve as main

if __name__ == "__main__":
    main()
