"""The cache under ``$SVDEXP_CACHE``: the entries (:mod:`.store`), the size budget and the folder's layout
(:mod:`.budget`), the runs' activation scratch files (:mod:`.scratch`) and ``svdexp-cache`` (:mod:`.cli`)."""
