"""``python -m llmfoundry_pl.train``: the same as ``lfpl-train`` (see llmfoundry_pl/cli/train.py)."""

from llmfoundry_pl.cli.commands import lfpl_train as main

if __name__ == "__main__":
    main()
