"""The objectives' names, the kind of data row each reads, and the pre-launch checks of
their knobs. No torch here: the launcher refuses a bad objective setting (and prints a dry
run) without importing the training side."""
from __future__ import annotations

from trainers.errors import UserError

# objective name -> kind of data row it reads (trainers.data.rows.ROW_KINDS). simpo and orpo
# follow TRL's CPO/ORPO tokenization, dpo/ipo/kto TRL's DPO/KTO one.
OBJECTIVE_ROWS = {"sft": "sft", "dpo": "pairs", "ipo": "pairs", "simpo": "pairs_text", "orpo": "pairs_text",
                  "kto": "unpaired", "reward": "pairs", "grpo": "prompts"}
# objectives that compare with a reference model
NEEDS_REFERENCE = ("dpo", "ipo", "kto")


def check_objective_name(name: str) -> None:
    if name not in OBJECTIVE_ROWS:
        raise UserError(f"objective={name!r} is not accepted; use one of: {', '.join(OBJECTIVE_ROWS)}.")


DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)
# TRL loss types left out, and why: "aot"/"aot_unpaired" sort the log-ratios across the
# micro-batch and "sft" is a token mean over the micro-batch, so none of them is a sum
# over pairs; they could only be split-invariant with a global pre-pass.


def knobs_of(cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def check_knobs(cfg) -> None:
    """Pre-launch checks of the objective's settings (one paragraph per bad value)."""
    knobs = knobs_of(cfg)
    name = knobs["name"]
    check_objective_name(name)
    if name == "grpo":
        from trainers.objectives.grpo_settings import check_knobs as check_grpo

        return check_grpo(knobs)
    for key in ("beta", "gamma", "desirable_weight", "undesirable_weight"):
        if key in knobs:
            v = knobs[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UserError(f"objective.{key}={v!r} must be a positive number (objective={name}).")
    if name == "reward":
        c = knobs["center_rewards_coefficient"]
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0):
            raise UserError(f"objective.center_rewards_coefficient={c!r} must be null (off, TRL's default) or a "
                            f"number >= 0 (TRL recommends 0.01): the weight of mean((r_chosen + r_rejected)^2), "
                            f"which keeps rewards centred on 0.")
    if name == "kto" and knobs["kl_pairs"] not in ("batch", "file_order"):
        raise UserError(f"objective.kl_pairs={knobs['kl_pairs']!r} is not accepted; use batch (each row's KL "
                        f"completion from the step's own batch, the default) or file_order (from its neighbour in "
                        f"the file, as TRL's KTOTrainer pairs them).")
    if name == "dpo":
        lt = knobs["loss_type"]
        if lt not in DPO_LOSS_TYPES:
            raise UserError(f"objective.loss_type={lt!r} is not accepted; use one of TRL's DPO loss types: "
                            f"{', '.join(DPO_LOSS_TYPES)} (aot, aot_unpaired and sft are not sums over pairs, "
                            f"so not split-invariant).")
        ls = knobs["label_smoothing"]
        if not isinstance(ls, (int, float)) or not 0 <= ls < 0.5:
            raise UserError(f"objective.label_smoothing={ls!r} must be in [0, 0.5) (robust, exo_pair).")
        rpo = knobs["rpo_alpha"]
        if rpo is None or isinstance(rpo, bool) or not isinstance(rpo, (int, float)) or rpo < 0:
            raise UserError(f"objective.rpo_alpha={rpo!r} must be a number >= 0: the weight of the chosen answers' "
                            f"NLL added to the DPO loss (0: plain DPO, TRL's default; e.g. 1.0 as in the RPO paper).")
        if lt == "exo_pair" and ls <= 0:
            raise UserError("objective.loss_type=exo_pair needs objective.label_smoothing > 0 (TRL refuses 0).")
