"""``python -m p2pfl`` is the same as the ``p2pfl`` command."""

import sys

from p2pfl.cli import main

sys.exit(main())
