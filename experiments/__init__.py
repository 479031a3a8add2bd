"""The experiments: one script per figure or table of the papers, run by ``quartic run NAME``.

Installed with the package as ``quartic.experiments`` (see ``pyproject.toml``), so that the
``quartic`` command finds them after a plain ``pip install .`` as after an editable install.
"""
