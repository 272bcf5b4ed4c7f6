"""`python -m lorakit ...`: the same as the `lorakit` command."""

import sys

from lorakit.cli import main

sys.exit(main())
