"""Model merging: `python -m launch.merge` (launch/merge.py) and a sweep's `merge.after_sweep`.

methods.py   the methods offered and the mergekit config each becomes
inputs.py    what an input names (run, model folder, sweep point) and every refusal
estimate.py  the memory a streamed merge needs, from tensor headers
adapters.py  adapters=true: LoRA adapters combined by PEFT's add_weighted_adapter
scoring.py   held-out scores of a model folder with the training loop's evaluator, by objective
run.py       one merge: checks, mergekit's merge, greedy soup, scores, report
report.py    merge_report.json and its table
"""
