"""``dist-peft compare``: every method on the same model, data and budget, several seeds, one report with tables,
plots and the papers' claims checked (``spec`` reads the compare file, ``runs`` runs it resumably, ``probes``
measures what the claims need, ``claims`` decides them, ``report`` writes ``report.md`` and the plots)."""
