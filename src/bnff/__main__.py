"""``python -m bnff``: the ``bnff`` command (what ``torchrun ... -m bnff train ...`` runs in each process)."""

import sys

from bnff.cli import main

if __name__ == "__main__":
    sys.exit(main())
