"""``python -m devicegw.cli``."""

import contextlib
import sys

from devicegw.cli.main import main

with contextlib.suppress(KeyboardInterrupt):
    sys.exit(main())
