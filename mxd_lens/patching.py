"""Moved to `mxd_lens.circuits.patching`; re-exported here so that existing imports keep working."""

from mxd_lens.circuits.patching import *  # noqa: F401,F403
from mxd_lens.circuits.patching import __all__  # noqa: F401
