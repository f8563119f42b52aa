"""``python -m toolpool.testing``: the test bed's command line (see ``_cli``)."""

from __future__ import annotations

import sys

from toolpool.testing._cli import main

if __name__ == "__main__":
    sys.exit(main())
