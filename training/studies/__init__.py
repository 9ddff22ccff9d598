"""Studies that reproduce published comparisons, one module per study, run by ``bsym study``."""
