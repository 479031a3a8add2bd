"""The machinery: configs, resumable run folders, checkpoints, plotting, sharding, the command line.

``config``, ``runs``, ``checkpoint``, ``plotting`` and ``distributed`` import only the core; ``cli``
is the top of the package and may import everything (``tests/test_layers.py`` checks it).
"""
