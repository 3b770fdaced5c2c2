"""What a run leaves behind besides its checkpoint: ``results.json`` (written atomically, read back, reused when
the same config is run again) and the W&B run (:mod:`.tracking`), and where the result came from
(:mod:`.provenance`)."""
