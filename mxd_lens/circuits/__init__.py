"""Circuit analysis through a replacement's units: activation and attribution patching,
faithfulness curves with the error term as a node, tasks, steering, expert inspection
and their figures.

    from mxd_lens.circuits import ioi_task, faithfulness_curve
"""

from mxd_lens.circuits.curves import *  # noqa: F401,F403
from mxd_lens.circuits.curves import __all__  # noqa: F401
