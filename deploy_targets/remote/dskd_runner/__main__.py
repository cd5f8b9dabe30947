"""`python -m dskd_runner ...` (with the package or its zip on sys.path): the runner's command line."""

import sys

from .cli import main

sys.exit(main())
