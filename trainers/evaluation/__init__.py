"""The evaluation wing: what the loop learns about a run while it trains.

evaluator (scores every held-out set: the objective's loss and metrics, exact match),
rounds (the eval schedule the loop calls at step 0, every eval and the end), judge
(before/best/final per set, early stopping, the forgetting alarm), keeper (the best
checkpoint, kept apart from keep_last rotation).
"""
