"""dblocks_titan: DiffusionBlocks block-wise training for torchtitan.

Importing the package applies the CPU / version patches of :mod:`dblocks_titan.compat` (each
only where needed) and exposes the config functions, so titan's native
``--module dblocks_titan --config debug_dblocks`` finds them.
"""

from dblocks_titan import compat

compat.apply()
