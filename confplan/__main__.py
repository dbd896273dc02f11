"""``python -m confplan``: the same CLI as the ``confplan`` console script (used to spawn VMM children)."""

import sys

from confplan.cli import main

sys.exit(main())
