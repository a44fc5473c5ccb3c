"""`duo sweep`: DUO over a β list, each point trained, attacked and evaluated per seed; one report.

The machinery is the comparison's (duo.compare): out/beta{β}/seed{s}/ with lora/, attacks/{name}/ and eval/,
every stage resumed, mean ± sd over seeds in compare.md.
"""

from duo.compare import SweepConfig, sweep

__all__ = ["SweepConfig", "sweep"]
