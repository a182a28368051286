"""`python -m ghostpen`: the same as the `ghostpen` command."""

import sys

from ghostpen.cli import main

sys.exit(main())
