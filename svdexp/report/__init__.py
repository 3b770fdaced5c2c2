"""``svdexp-report``: a sweep as one tidy frame and its tables and plot (:mod:`.frame`), the row labels
(:mod:`.labels`), the wide tables' cells and formats (:mod:`.tables`), the papers' numbers (:mod:`.published`) and
the plots (:mod:`.plots`, also a run's ``layer_ratios.png``)."""
