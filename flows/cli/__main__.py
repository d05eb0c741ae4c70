"""``python -m flows.cli``: the ``loraflow`` command without the installed script."""

import sys

from flows.cli.main import main

sys.exit(main())
