"""``python -m llmfoundry_pl.serve``: the same as ``lfpl-serve`` (see llmfoundry_pl/cli/serve.py)."""

from llmfoundry_pl.cli.serve import main

if __name__ == "__main__":
    main()
