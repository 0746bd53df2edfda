"""Moved to `mxd_lens.circuits.steering`; re-exported here so that existing imports keep working."""

from mxd_lens.circuits.steering import *  # noqa: F401,F403
from mxd_lens.circuits.steering import __all__  # noqa: F401
