"""``python -m llmfoundry_pl.eval``: the same as ``lfpl-eval`` (see llmfoundry_pl/cli/eval.py)."""

from llmfoundry_pl.cli.commands import lfpl_eval as main

if __name__ == "__main__":
    main()
