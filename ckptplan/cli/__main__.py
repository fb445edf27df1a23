"""``python -m ckptplan.cli``: the ``ckptplan`` command."""

from . import main

main()
