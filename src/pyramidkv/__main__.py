"""``python -m pyramidkv ...`` runs the command line (``torchrun -m pyramidkv`` too)."""

from pyramidkv.cli import main

main()
