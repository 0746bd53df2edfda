"""Moved to `mxd_lens.architectures.transcoder`; re-exported here so that existing imports keep working."""

from mxd_lens.architectures.transcoder import *  # noqa: F401,F403
from mxd_lens.architectures.transcoder import __all__  # noqa: F401
