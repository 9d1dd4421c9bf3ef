"""A run's results: its folder and records (:mod:`.records`), reports over many runs
(:mod:`.report`) and sweeps of runs (:mod:`.sweep`)."""
