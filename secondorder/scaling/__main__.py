"""``python -m secondorder.scaling``: see :mod:`secondorder.scaling`."""

from secondorder.scaling.cli import main

main()
