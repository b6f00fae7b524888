"""`python -m vae_mlops`: see `cli.py`."""

import sys

from vae_mlops.cli import main

sys.exit(main())
