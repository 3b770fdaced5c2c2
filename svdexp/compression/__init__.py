"""The compression pipeline: calibration passes (:mod:`.calibration`), the statistics a run needs and where they
come from (:mod:`.statistics`), the layer loop that factorises every targeted matrix (:mod:`.compress`) and the
low-rank module with its accounting (:mod:`.lowrank`)."""
