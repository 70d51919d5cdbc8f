"""``python -m llmfoundry_pl.bench``: the same as ``lfpl-bench`` (see llmfoundry_pl/cli/bench.py)."""

from llmfoundry_pl.cli.commands import lfpl_bench as main

if __name__ == "__main__":
    main()
