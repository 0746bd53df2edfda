"""`python -m mxd_lens ...` is `mxd-lens ...`."""

import sys

from mxd_lens.cli import main

sys.exit(main())
