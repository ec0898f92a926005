"""Pre-trained weights read a slice at a time, straight into what a rank keeps.

A 70B base is 140 GB in bf16: no rank may hold all of it unless its plan keeps all of
it. So the model is first built as a *skeleton* (`trainers/model/load.py`): every weight that
comes from the checkpoint is a zero-byte placeholder, and only what is created fresh
(LoRA adapters, prompt embeddings) is real. Each plan then fills in its own share:

- the whole tensor (none, ddp, zero1/2 and the layers a pipeline stage owns),
- the rows of a dim-0 shard (FSDP2's DTensor `Shard(0)`),
- one module's tensors at a time, partitioned before the next is read (ZeRO-3),
- a 4-bit weight quantized from its whole tensor as it arrives (QLoRA: an FSDP2 unit at a
  time, sharded before the next; a pipeline stage's own layers).

Only the requested bytes are read (no memory map), so a rank's peak is its own share plus
one tensor's rows in flight, never the whole model.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from trainers.errors import UserError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointFiles:
    """The tensors of a local Hugging Face model directory (one or several safetensors
    files), by checkpoint key.

    Reads with pread at the offsets the safetensors header gives, not through a memory
    map: mapped pages count in the process's RSS for as long as the file stays mapped, so
    a mapped 140 GB checkpoint would look (and, under memory pressure, behave) like a
    rank holding all of it. Here a rank holds exactly the bytes it asked for."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            files = sorted({self.directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif single.is_file():
            files = [single]
        else:
            raise UserError(
                f"model.path={str(directory)!r} has no model.safetensors (or sharded "
                f"model.safetensors.index.json). Convert the weights to safetensors "
                f"(save_pretrained(..., safe_serialization=True))."
            )
        self.file_of: dict[str, Path] = {}
        self._entry: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}  # dtype, shape, byte offset
        for path in files:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise UserError(f"{path}: tensor {key!r} has dtype {meta['dtype']}, which this loader does not read.")
                self.file_of[key] = path
                self._entry[key] = (_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + meta["data_offsets"][0])
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0  # what this rank actually read (tests and logs)

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                   for dtype, shape, _ in self._entry.values())

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self):
        return self.file_of.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry[key][1]

    def _read_elements(self, key: str, start: int, stop: int) -> torch.Tensor:
        dtype, _, offset = self._entry[key]
        size = torch.empty((), dtype=dtype).element_size()
        path = self.file_of[key]
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        buf = bytearray((stop - start) * size)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self._fds[path], [view[done:]], offset + start * size + done)
            if got <= 0:
                raise UserError(f"{path} ends early (truncated?) while reading {key!r}.")
            done += got
        self.bytes_read += len(buf)
        return torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)

    def read(self, key: str, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of dim 0), converted to `dtype`."""
        shape = self.shape(key)
        row = math.prod(shape[1:]) if shape else 1
        first, last = (0, shape[0] if shape else 1) if rows is None else rows
        t = self._read_elements(key, first * row, last * row)
        t = t.reshape((last - first, *shape[1:]) if shape else ())
        return t.to(dtype) if t.is_floating_point() else t

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------- skeletons
def make_placeholder(shape, dtype: torch.dtype) -> nn.Parameter:
    """A frozen parameter of the right shape, dtype and device (CPU) that owns one element:
    PEFT reads shape, dtype and device from base weights to create its adapters, and would
    move them to the meta device if the base were there."""
    return nn.Parameter(torch.zeros((), dtype=dtype).expand(tuple(shape)), requires_grad=False)


def is_placeholder(t: torch.Tensor) -> bool:
    if hasattr(t, "device_mesh"):  # a DTensor: sharded from loaded weights already
        return False
    return t.device.type != "meta" and t.numel() > 1 and t.untyped_storage().nbytes() <= t.element_size()


def checkpoint_key(name: str) -> str:
    """Our parameter name -> the checkpoint's key: PEFT wraps the HF model
    (`base_model.model.` for LoRA-style tuners, `base_model.` for prompt learning) and
    moves a replaced linear's weight under `.base_layer`; a module it trains in full
    (modules_to_save: a reward model's score head) keeps the original under
    `.original_module` and the trained copy under `.modules_to_save.<adapter>`."""
    import re

    name = re.sub(r"\.(original_module|modules_to_save\.[^.]+)\.", ".", name)
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix) and not name.startswith("base_model.model.base_model"):
            name = name[len(prefix):]
            break
    return name.replace(".base_layer.", ".")


def checkpoint_names(model: nn.Module, files: CheckpointFiles) -> dict[str, str]:
    """Parameter name -> checkpoint key, for the parameters that come from the checkpoint
    (placeholders). A placeholder the files do not have is a clear error, not zeros."""
    out, missing = {}, []
    for name, p in model.named_parameters():
        if not is_placeholder(p):
            continue
        key = _resolve_key(name, files)
        if key is None:
            missing.append(name)
        else:
            out[name] = key
    if missing:
        raise UserError(
            f"model.path={str(files.directory)!r} lacks {len(missing)} weight(s) the model needs, e.g. "
            f"{missing[0]!r} (looked up as {checkpoint_key(missing[0])!r}). Point model.path at a "
            f"complete save_pretrained directory of this architecture."
        )
    return out


def _resolve_key(name: str, files: CheckpointFiles) -> str | None:
    key = checkpoint_key(name)
    if key in files:
        return key
    # Some saves prefix the backbone differently (e.g. without the "model." of *ForCausalLM).
    for candidate in (key.removeprefix("model."), "model." + key):
        if candidate in files:
            return candidate
    return None


def replace_parameters(model: nn.Module, new_for) -> None:
    """One pass: each parameter for which `new_for(name, p)` returns a new one is replaced
    wherever it is registered (tied weights share one object, so they stay tied)."""
    new = {}
    for name, p in model.named_parameters():  # each shared object once, under its first name
        replacement = new_for(name, p)
        if replacement is not None:
            new[id(p)] = replacement
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[pname] = new[id(p)]


def replace_parameter(model: nn.Module, name: str, new: nn.Parameter) -> None:
    """Put `new` wherever `name`'s parameter object is registered."""
    old = model.get_parameter(name)
    replace_parameters(model, lambda _, p: new if p is old else None)


# ------------------------------------------------------------------ materialize
def is_4bit(p: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight (quantized or still a placeholder)."""
    return type(p).__name__ == "Params4bit"


def placeholder_index(model: nn.Module, files: CheckpointFiles) -> dict[nn.Parameter, tuple[str, str]]:
    """Each placeholder -> (its parameter name, its checkpoint key), resolved once for the
    whole model: plans fill a model module by module (ZeRO-3) or unit by unit (FSDP2), and
    each fill then only looks up its own parameters. Keyed by the placeholder objects, which
    the index keeps alive until they are filled."""
    return {model.get_parameter(name): (name, key) for name, key in checkpoint_names(model, files).items()}


@torch.no_grad()
def fill_placeholders(model: nn.Module, files: CheckpointFiles, device: torch.device,
                      within: nn.Module | None = None, quantize=None, recurse: bool = True,
                      index: dict | None = None) -> None:
    """Each placeholder of `within` (default: the whole model) becomes its full tensor from
    the files, on `device`, one tensor at a time. A 4-bit placeholder is quantized as it
    arrives, by `quantize(name, value)` (trainers/model/load.py: transformers' own quantize op),
    so its bf16 tensor is alive only until the next one is read. `index` (placeholder_index)
    is shared by the fills of one model; filled entries leave it."""
    if index is None:
        index = placeholder_index(model, files)
    for p in list((within if within is not None else model).parameters(recurse=recurse)):
        entry = index.pop(p, None)
        if entry is None:  # not from the checkpoint, or already filled
            continue
        name, key = entry
        value = files.read(key, p.dtype).to(device)
        new = quantize(name, value) if is_4bit(p) else nn.Parameter(value)
        replace_parameter(model, name, new.requires_grad_(p.requires_grad))


@torch.no_grad()
def init_dora_magnitudes(model: nn.Module, rows_of=None, gather=None) -> None:
    """DoRA's magnitude starts as the row norms of the base weight (its B starts at zero).
    PEFT computed it from the placeholders; compute it from the loaded weights, the way
    PEFT does (norm over dim 1, in the base weight's dtype). `rows_of(weight)` gives the
    locally held rows of a dim-0-sharded weight; `gather(params)` is a context that makes
    partitioned parameters whole (and writes rank 0's values back)."""
    from contextlib import nullcontext

    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not magnitudes:
            continue
        weight = module.get_base_layer().weight
        vectors = [layer.weight for layer in magnitudes.values()]
        with gather([weight, *vectors]) if gather else nullcontext():
            local = rows_of(weight) if rows_of else weight
            norm = torch.linalg.norm(local.float() if local.dtype == torch.float16 else local, dim=1).to(local.dtype)
            for vector in vectors:
                (rows_of(vector) if rows_of else vector).copy_(norm)
