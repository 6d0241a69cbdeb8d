"""`python -m minilm.cli ...` runs the `minilm` command."""

import sys

from minilm.cli import main

sys.exit(main())
