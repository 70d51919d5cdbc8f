"""``python -m llmfoundry_pl.plan``: the same as ``lfpl-plan`` (see llmfoundry_pl/cli/plan.py)."""

from llmfoundry_pl.cli.commands import lfpl_plan as main

if __name__ == "__main__":
    main()
