"""``python -m zomem`` is the ``zomem`` command."""

import sys

from zomem.cli import main

sys.exit(main())
