"""dblocks_titan: DiffusionBlocks block-wise training for torchtitan.

Importing the package applies the CPU / version patches of :mod:`dblocks_titan.compat` (each
only where needed) and makes an uncaught :class:`dblocks_titan.errors.InputError` print one line
(:func:`dblocks_titan.errors.install_excepthook`: titan's native ``--module dblocks_titan`` launch too).
"""

from dblocks_titan import compat, errors

compat.apply()
errors.install_excepthook()
