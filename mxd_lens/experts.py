"""Moved to `mxd_lens.circuits.experts`; re-exported here so that existing imports keep working."""

from mxd_lens.circuits.experts import *  # noqa: F401,F403
from mxd_lens.circuits.experts import __all__  # noqa: F401
