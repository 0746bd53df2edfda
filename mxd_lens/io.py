"""Moved to `mxd_lens.storage`; re-exported here so that existing imports keep working."""

from mxd_lens.storage import *  # noqa: F401,F403
from mxd_lens.storage import __all__  # noqa: F401
