"""The data wing: from a file on disk to the token batches the loop consumes.

rows (reading and checking a row of any kind), preference_rows (pairs and unpaired rows),
encoding (rows to token ids and loss masks), token_cache (tokenize once, memory-mapped),
packing and batches (rows to global batches and each rank's micro-batches), sources (the
configured train/eval sources, mixed and cached), neftune (embedding noise in training).
"""
