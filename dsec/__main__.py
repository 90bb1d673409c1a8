"""Entry point of `python -m dsec` (see dsec.cli)."""

import sys

from dsec.cli import main

sys.exit(main())
