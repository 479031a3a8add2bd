"""The studies: the collapse study on the transformer, transfer and robustness, defences, the
checked forecast, the onset ladder, the law's measurements, and ``diagnose`` on a user's model.

Studies import the core, the models, the tasks and the harness's base (runs, checkpoints, plots);
never the command line (``tests/test_layers.py`` checks it).
"""
