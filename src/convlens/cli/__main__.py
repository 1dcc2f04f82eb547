"""``python -m convlens.cli``: the command line."""

import sys

from convlens.cli import main

sys.exit(main())
