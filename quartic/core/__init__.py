"""The mathematics: curvature, the AIC, the theory, the dynamics, fitting, model families.

This layer imports no model, task, study or harness module (``tests/test_layers.py`` checks it).
"""
