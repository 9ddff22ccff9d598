"""``python -m bsym``: the same as the ``bsym`` command."""

from bsym.cli import main

main()
