"""The metrics wing: one stream of step and eval metrics, written by rank 0 to every sink.

sinks (metrics.jsonl, the console, the end-of-run plot and summary), trackers (TensorBoard,
W&B, MLflow, trackio as sinks of the same stream), throughput (tokens/s, TFLOP/s, MFU),
device (per rank at the end of a run: device, backend, compute dtype, CUDA peak; read by
scripts/gpu_check.py).
"""
