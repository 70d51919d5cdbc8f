"""``python -m llmfoundry_pl.eval``: the same as ``lfpl-eval`` (see llmfoundry_pl/cli/eval.py)."""

from llmfoundry_pl.cli.eval import main

if __name__ == "__main__":
    main()
