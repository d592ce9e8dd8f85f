"""The applications over the library: the ``stability`` CLI, ``stability plot`` and ``make demo``."""
