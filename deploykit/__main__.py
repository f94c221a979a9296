"""``python -m deploykit`` (and ``torchrun -m deploykit``) run the command line."""

from deploykit.cli import main

main()
