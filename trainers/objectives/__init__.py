"""The objectives wing: what the one training loop minimises.

catalog (the Objective type and the name -> objective table), lm_loss (the chunked
language-model loss SFT and ORPO share), preference (TRL's DPO/IPO/SimPO/ORPO/KTO losses),
reference (the reference model's log-probs, precomputed for full fine-tuning). New
objectives (GRPO, reward models) live here beside them.
"""
