"""``python -m rollout run CONFIG ...``: see rollout.cli."""

import sys

from rollout.cli import main

sys.exit(main())
