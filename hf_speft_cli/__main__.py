"""`python -m hf_speft_cli` runs `hf-speft`."""

import sys

from . import main

sys.exit(main())
