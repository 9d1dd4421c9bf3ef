"""Running a federation: the launcher (:mod:`.launch`, Flower's simulation engine on Ray),
the in-process engine (:mod:`.inprocess`) and a real deployment (:mod:`.deploy`).

This is the app layer's side of the package: it wires the apps, the strategies and the
core together, and nothing in the core imports it (``tests/test_import_direction.py``).
"""
