"""instructrec: recommendation as instruction following.

The layers live in instructrec.engine, instructrec.kernels, instructrec.training,
instructrec.export and instructrec.bench; this package holds only the CLI dispatcher.
"""

__version__ = "0.1.0"
