"""What a merge input names, and whether it can be merged: every refusal happens here, from
file headers and run records only, before any weight is read or anything is written.

An input is a run directory (its `export/merged`: a LoRA run is merged in its merged form;
with adapters=true, its `export/adapter`), a model folder (config.json + safetensors), or,
through `sweep=SWEEP_DIR`, every completed point of a sweep.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from launch.config import load
from launch.run_state import IN_PROGRESS, derive_status, read_state
from trainers.errors import UserError
from trainers.files import read_json


@dataclass
class MergeInput:
    given: str  # as the user wrote it
    model_dir: Path  # the HF folder merged (export/merged, or the model folder itself)
    run_dir: Path | None = None
    run_cfg: object = None  # the run's saved config.yaml
    adapter_dir: Path | None = None
    label: str = ""
    shapes: dict = field(default_factory=dict)  # tensor name -> (dtype, shape), from headers

    @property
    def score_dir(self) -> Path | None:
        """The model folder its held-out score is measured on: an adapter's, its run's merged
        export (None for a bare adapter folder, which is then not scored)."""
        if self.adapter_dir is None:
            return self.model_dir
        merged = self.run_dir / "export" / "merged" if self.run_dir is not None else None
        return merged if merged is not None and is_model_dir(merged) else None

    @property
    def base_path(self) -> str | None:
        """The model the run started from (its model.path), None for a model folder."""
        return str(self.run_cfg.model.path) if self.run_cfg is not None else None


def _refuse(given: str, reason: str) -> UserError:
    return UserError(f"input {given!r} cannot be merged: {reason}")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def tensor_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes of a model folder's tensors, read from the safetensors
    headers only (no weight is loaded)."""
    from safetensors import safe_open

    out = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                out[key] = (piece.get_dtype(), tuple(piece.get_shape()))
    return out


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() and bool(safetensors_files(path))


def run_status(run_dir: Path) -> str | None:
    """The run's status as `python -m launch.status` derives it; None when it has left no
    record of an end (no summary.json, no attempt record): still training, or killed."""
    summary, state = read_json(run_dir / "summary.json"), read_state(run_dir)
    if not summary and not state:
        return None
    return derive_status(summary, state)


def resolve(given: str, adapters: bool = False) -> MergeInput:
    path = Path(str(given)).expanduser()
    if not path.exists():
        raise _refuse(given, "no such file or directory. Give a run directory (with export/merged) or a model "
                             "folder (config.json and *.safetensors).")
    if (path / "sweep.json").exists():
        raise _refuse(given, f"it is a sweep directory; merge its finished points with sweep={given}.")
    if (path / "config.yaml").exists() and not (path / "config.json").exists():
        return _resolve_run(given, path.resolve(), adapters)
    if adapters and (path / "adapter_config.json").exists():
        return MergeInput(given, path.resolve(), adapter_dir=path.resolve(), label=path.name)
    if is_model_dir(path):
        return MergeInput(given, path.resolve(), label=path.name, shapes=tensor_shapes(path))
    raise _refuse(given, "neither a run directory (config.yaml) nor a model folder (config.json and "
                         "*.safetensors).")


def _resolve_run(given: str, run_dir: Path, adapters: bool) -> MergeInput:
    status = run_status(run_dir)
    if status is None:
        raise _refuse(given, "the run has no summary.json: it is still training (or was killed before its end). "
                             "Merge it once it has completed.")
    if status in IN_PROGRESS:
        raise _refuse(given, f"the run is still training (status {status!r}). Merge it once it has completed.")
    if status != "completed":
        raise _refuse(given, f"the run ended with status {status!r}, not 'completed', so it has no final export. "
                             f"Relaunch it with hydra.run.dir={run_dir} to finish it (it resumes from its last "
                             f"checkpoint), or leave it out.")
    cfg = load(run_dir / "config.yaml")
    export = run_dir / "export"
    label = run_dir.name if run_dir.name not in ("", ".") else str(run_dir)
    if adapters:
        adapter = export / "adapter"
        if not (adapter / "adapter_config.json").exists():
            raise _refuse(given, f"adapters=true needs the run's PEFT adapter, and {adapter} does not exist "
                                 f"(method={cfg.method.name} exports "
                                 f"{'no adapter' if cfg.method.peft is None else 'none here'}). "
                                 f"Drop adapters=true to merge the runs' merged models.")
        return MergeInput(given, adapter, run_dir, cfg, adapter_dir=adapter, label=label)
    merged = export / "merged"
    if not is_model_dir(merged):
        from trainers.model.peft_methods import MERGEABLE

        if cfg.method.peft is not None and cfg.method.peft not in MERGEABLE:
            reason = (f"method={cfg.method.name} adds virtual tokens, not weight deltas, so the run has only "
                      f"{export / 'adapter'} and no merged model; runs of weight methods (full, lora, dora, ia3, "
                      f"...) can be merged")
        else:
            reason = f"its export is missing ({merged} has no config.json and safetensors)"
        raise _refuse(given, reason + ".")
    return MergeInput(given, merged, run_dir, cfg, label=label, shapes=tensor_shapes(merged))


def sweep_inputs(sweep_dir: str, adapters: bool = False) -> tuple[list[MergeInput], list[dict]]:
    """The completed points of a sweep (in point order), and the others with the reason
    each is left out."""
    root = Path(str(sweep_dir)).expanduser()
    manifest = read_json(root / "sweep.json")
    if not manifest.get("points"):
        raise UserError(f"sweep={sweep_dir!r} is not a sweep directory (no sweep.json with points); give the "
                        f"directory `python launch.py -m ...` printed (runs/sweeps/...).")
    used, left_out = [], []
    for point in manifest["points"]:
        try:
            used.append(resolve(point["run_dir"], adapters))
            used[-1].label = f"point {point['num']} ({' '.join(point['overrides']) or 'defaults'})"
        except UserError as e:
            left_out.append({"num": point["num"], "run_dir": point["run_dir"], "reason": str(e)})
    return used, left_out


def check_compatible(inputs: list[MergeInput], base: MergeInput | None) -> None:
    """Same architecture and the same tensors of the same shapes, or a refusal naming the
    input that differs and how."""
    ref = base or inputs[0]
    ref_arch = _architecture(ref.model_dir)
    for item in inputs:
        if item is ref:
            continue
        arch = _architecture(item.model_dir)
        if arch != ref_arch:
            raise _refuse(item.given, f"its architecture is {arch[0]} ({arch[1]}), while {ref.given} is "
                                      f"{ref_arch[0]} ({ref_arch[1]}); only models of one architecture merge.")
        if not item.shapes or not ref.shapes:
            continue  # adapters: PEFT checks their shapes against the base
        missing = sorted(set(ref.shapes) - set(item.shapes))
        extra = sorted(set(item.shapes) - set(ref.shapes))
        if missing or extra:
            raise _refuse(item.given, f"its tensors differ from {ref.given}'s: "
                                      f"{'missing ' + ', '.join(missing[:3]) if missing else ''}"
                                      f"{'; ' if missing and extra else ''}"
                                      f"{'extra ' + ', '.join(extra[:3]) if extra else ''}; only fine-tunes of one model merge.")
        for key, (_, shape) in ref.shapes.items():
            if item.shapes[key][1] != shape:
                raise _refuse(item.given, f"tensor {key} has shape {list(item.shapes[key][1])} where {ref.given} "
                                          f"has {list(shape)}: the models differ in size; only fine-tunes of one "
                                          f"model merge.")


def _architecture(folder: Path) -> tuple[str, str]:
    values = read_json(folder / "config.json")
    if not values and (folder / "adapter_config.json").exists():
        values = {"architectures": ["peft adapter"],
                  "model_type": read_json(folder / "adapter_config.json").get("base_model_name_or_path")}
    return (",".join(values.get("architectures") or ["?"]), str(values.get("model_type")))


def default_base(inputs: list[MergeInput], method_name: str) -> str:
    """The runs' common model.path (the base their task vectors are deltas from)."""
    paths = {i.base_path for i in inputs}
    if None in paths:
        folder = next(i.given for i in inputs if i.base_path is None)
        raise UserError(f"method={method_name} needs a base model (task vectors are differences from it) and "
                        f"input {folder!r} is a model folder, not a run, so it does not say which: give base=PATH.")
    if len(paths) > 1:
        raise UserError(f"method={method_name} needs one base model, and the runs started from different ones "
                        f"({', '.join(sorted(paths))}): give base=PATH, or merge runs of one base.")
    return paths.pop()
