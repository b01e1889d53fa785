"""python -m llamaship: the CLI."""

import sys

from llamaship.cli import main

sys.exit(main())
