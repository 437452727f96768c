"""``python -m mesh.cli``: the same as the ``mesh`` command."""

from mesh.cli import main

main()
