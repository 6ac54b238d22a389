"""What a run shows: the run dir's files, plots and report (:mod:`~attn_search.report.outputs`),
the console's progress (:mod:`~attn_search.report.progress`) and the chosen configuration's
attention drawn (:mod:`~attn_search.report.attention_map`)."""
