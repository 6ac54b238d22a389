"""The search: the one loop (:mod:`~attn_search.search.loop`: ``SearchOptions``, ``run_search``)
and what it decides with: the space (:mod:`~attn_search.search.space`), early stopping
(:mod:`~attn_search.search.pruning`), the front (:mod:`~attn_search.search.pareto`), the failure
policy (:mod:`~attn_search.search.failures`), evaluators other than training
(:mod:`~attn_search.search.evaluators`) and the run dir's record (:mod:`~attn_search.search.rundir`).

Importing the package imports none of them: strategies and backends use the space without loading
the loop that drives them.
"""
