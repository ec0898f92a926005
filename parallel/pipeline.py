"""parallel=pipeline: torch.distributed.pipelining over decoder layers, data parallel across.

Layout. The world is a 2-D mesh ("dp", "pp") with `parallel.stages` processes per pipeline;
rank = dp_index * stages + stage. Each rank builds the same seeded model, then deletes what
it does not own (the torchtitan way): the decoder layers are cut into balanced contiguous
groups, embeddings stay on the first stage, the final norm and lm_head on the last. Kept
layers keep their original index (`model.layers.5...`), so parameter names, checkpoint
keys and the exported state dict are those of the unsplit model. With
`schedule=interleaved_1f1b` every rank holds two virtual stages (r and r + stages).

Forward of a stage. The first stage embeds the tokens; every stage then calls the HF
backbone (LlamaModel) with `inputs_embeds` and only its own layers swapped in, which
recomputes position ids, the rotary (cos, sin) and the causal / packed mask locally; the
last stage adds the final norm and (for evaluation; training applies it in the loss) the
lm_head. PEFT adapters (LoRA, DoRA, IA3, ...) live inside the layers, so they work
unchanged; the PeftModel forward itself is bypassed, which is why virtual-token methods
(prefix, prompt) are refused. Activation checkpointing (train.activation_checkpointing)
reaches the stages through the layer modules themselves (trainers/memory.py).

Loss. A step's rows (train.micro_batch_size x grad_accum per dp rank) are padded to one
width (a multiple of 8) and cut into `parallel.microbatches` equal pipeline micro-batches.
The training schedule's last stage ends at the final norm, because the loss needs the
labels, which only loss_fn receives: loss_fn applies the lm_head through
trainers/objectives/lm_loss.py's lm_ce_sum (the loss every plan uses, chunked over tokens when the
logits would be large) and returns the summed token cross-entropy divided by the target
count of the whole global batch (`scale_grads=False`), so gradients are exactly those of
the single-process token mean. Gradients are then summed over the dp group by hand (one
flat all_reduce; no DDP), and the gradient norm for clipping is reduced over the pp group.

Evaluation. `eval_model` is a thin module whose forward runs the pipeline forward-only
and broadcasts the logits from the last stage to its pipeline group (so the shared
Evaluator's per-rank sums stay consistent), and whose `generate` does greedy decoding
through the pipeline (no KV cache: the full sequence is re-run per new token; fine for
eval-sized prompts) with the next-token ids broadcast from the last stage.

Checkpoints use DCP as in the base plan, per stage (each rank writes the keys it owns;
dp replicas are de-duplicated), with the optimizer state flattened to per-parameter keys
(param_groups differ between stages). Export gathers every stage's state dict on rank 0.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from parallel.base import Plan
from parallel.specs import VIRTUAL_STAGES
from trainers.data.rows import IGNORE
from trainers.errors import UserError
from trainers.objectives.lm_loss import lm_ce_sum, plain_logits

log = logging.getLogger(__name__)

WIDTH_MULTIPLE = 8  # pad widths up to this, so few distinct shapes (and schedules) exist
MAX_CACHED_SCHEDULES = 8


def split_layers(n_layers: int, n_chunks: int) -> list[range]:
    """Contiguous, balanced layer ranges (sizes differ by at most one; earlier chunks
    take the extra layers since the last one also carries the final norm and lm_head)."""
    base, extra = divmod(n_layers, n_chunks)
    out, start = [], 0
    for i in range(n_chunks):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class KeptLayers(nn.ModuleList):
    """The decoder layers a stage owns, registered under their original indices so
    parameter names match the unsplit model. Iteration and slicing (what HF backbones
    do: `self.layers[: config.num_hidden_layers]`) run over the kept layers in order."""

    def __init__(self, layers: dict[int, nn.Module] | list | None = None):
        super().__init__()
        if isinstance(layers, dict):
            for i, m in layers.items():
                self.add_module(str(i), m)
        elif layers:
            for i, m in enumerate(layers):
                self.add_module(str(i), m)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]


def _backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the *ForCausalLM, its decoder backbone) of a HF model, also inside a PeftModel."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(causal, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if backbone is None or not all(hasattr(backbone, a) for a in needed) or not hasattr(causal, "lm_head"):
        raise UserError(
            f"parallel=pipeline splits Llama-family models (model.embed_tokens, model.layers, "
            f"model.norm, lm_head); {type(causal).__name__} does not have that layout. Use "
            f"parallel=fsdp2 or ddp."
        )
    return causal, backbone


class StageChunk(nn.Module):
    """One pipeline stage: a slice of decoder layers, plus the embeddings if first and
    the final norm + lm_head if last. Input: token ids (first) or hidden states; output:
    hidden states or logits (last)."""

    def __init__(self, plan: "Pipeline", backbone, layers: KeptLayers, embed, norm, lm_head):
        super().__init__()
        self.layers = layers
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head
        # not registered: the backbone is only borrowed for its forward
        self.__dict__["_backbone"] = backbone
        self.__dict__["_plan"] = plan

    def forward(self, x, attention_mask=None, position_ids=None):
        bb = self._backbone
        with self._plan.autocast():
            h = self.embed(x) if self.embed is not None else x
            saved = bb._modules["layers"], bb._modules["norm"]
            bb._modules["layers"] = self.layers
            bb._modules["norm"] = self.norm if self.norm is not None else nn.Identity()
            try:
                h = bb(inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
            finally:
                bb._modules["layers"], bb._modules["norm"] = saved
            if self.lm_head is not None:
                h = self.lm_head(h)
        return h


def pad_batch(batch: dict, width: int) -> dict:
    """Right-pad a collated batch to `width`: ignored labels, masked (or, packed, a new
    pseudo-sequence of) positions. Real tokens never see the padding (causal)."""
    out = dict(batch)
    w = batch["input_ids"].size(1)
    extra = width - w
    if extra <= 0:
        return out
    rows = batch["input_ids"].size(0)
    out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_zeros(rows, extra)], 1)
    if "labels" in batch:
        out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((rows, extra), IGNORE)], 1)
    if "position_ids" in batch:
        tail = torch.arange(extra, dtype=batch["position_ids"].dtype).expand(rows, extra)
        out["position_ids"] = torch.cat([batch["position_ids"], tail], 1)
    if "attention_mask" in batch:
        out["attention_mask"] = torch.cat([batch["attention_mask"], batch["attention_mask"].new_zeros(rows, extra)], 1)
    return out


def stack_micro_batches(micro: list[dict]) -> dict:
    """All of a step's micro-batches as one batch of a single (rounded-up) width."""
    width = round_up(max(b["input_ids"].size(1) for b in micro), WIDTH_MULTIPLE)
    padded = [pad_batch(b, width) for b in micro]
    out = {k: torch.cat([b[k] for b in padded], 0) for k in padded[0] if isinstance(padded[0][k], torch.Tensor)}
    out["n_real_tokens"] = sum(b["n_real_tokens"] for b in micro)
    return out


class PipelineEvalModel(nn.Module):
    """What the shared Evaluator calls: forward -> logits (on every rank of the pipeline
    group), generate -> greedy decoding through the pipeline."""

    def __init__(self, plan: "Pipeline", model: nn.Module):
        super().__init__()
        self.model = model  # registered so .eval()/.train() reach the stage modules
        self.__dict__["_plan"] = plan

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **_):
        width = input_ids.size(1)
        batch = {"input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if position_ids is not None:
            batch["position_ids"] = position_ids
        with plain_logits():  # the Evaluator's loss computes from these logits, not in the stages
            logits = self._plan.forward_only(pad_batch(batch, round_up(width, WIDTH_MULTIPLE)))
        return SimpleNamespace(logits=self._plan.broadcast_from_last(logits)[:, :width])

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **_):
        """Greedy decoding (what the Evaluator asks for: do_sample=False), left-padded
        prompts, the same stopping rule as transformers' generate."""
        plan = self._plan
        rows, width = input_ids.shape
        total = round_up(width + max_new_tokens, WIDTH_MULTIPLE)
        ids = torch.full((rows, total), pad_token_id, dtype=input_ids.dtype)
        ids[:, :width] = input_ids.cpu()
        mask = torch.zeros_like(ids)
        mask[:, :width] = attention_mask.cpu()
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []))
        done = torch.zeros(rows, dtype=torch.bool)
        cur = width
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            pos = pos.masked_fill(mask == 0, 1)
            logits = plan.forward_only({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
            nxt = logits[:, cur - 1].argmax(-1) if logits is not None else torch.zeros(rows, dtype=ids.dtype)
            nxt = plan.broadcast_from_last(nxt.to(ids.dtype))
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            ids[:, cur] = nxt
            mask[:, cur] = 1
            cur += 1
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
        return ids[:, :cur].to(input_ids.device)


class Pipeline(Plan):
    # --------------------------------------------------------------------- topology
    @property
    def stages(self) -> int:
        return int(self.cfg.parallel.stages)

    @property
    def dp_rank(self) -> int:
        return self.env.rank // self.stages

    @property
    def dp_world(self) -> int:
        return self.env.world_size // self.stages

    @property
    def pp_rank(self) -> int:
        return self.env.rank % self.stages

    def _global_rank(self, pp_rank: int) -> int:
        return self.dp_rank * self.stages + pp_rank

    # ------------------------------------------------------------------------ setup
    def build(self, source) -> nn.Module:
        """This stage's part of the model. Each stage prunes the skeleton (zero-byte
        placeholders) to its own layers first, then reads only those layers' tensors from the
        checkpoint; a 4-bit base quantizes them as they arrive (QDoRA loads whole, then prunes)."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():  # refuse() guarantees world_size >= stages >= 2
            raise UserError("parallel=pipeline needs several processes (launcher.nproc_per_node).")
        self.mesh = init_device_mesh(self.env.device.type, (self.dp_world, self.stages), mesh_dim_names=("dp", "pp"))
        self.pp_group = self.mesh.get_group("pp")
        self.dp_group = self.mesh.get_group("dp")
        assert dist.get_rank(self.pp_group) == self.pp_rank

        model = source.skeleton() if source.loads_in_parts else source.whole(self.env.device)
        causal, bb = _backbone(model)
        virtual = VIRTUAL_STAGES[self.cfg.parallel.schedule]
        self.n_chunks = self.stages * virtual
        self.last_stage = self.n_chunks - 1
        ranges = split_layers(len(bb.layers), self.n_chunks)
        mine = [self.pp_rank + v * self.stages for v in range(virtual)]  # loop layout
        layers = list(bb.layers)
        owned = {i: layers[i] for s in mine for i in ranges[s]}
        bb.layers = KeptLayers(owned)
        del layers
        if 0 not in mine:
            bb.embed_tokens = None
        if self.last_stage not in mine:
            bb.norm = nn.Identity()
            causal.lm_head = None
        self.chunks: list[tuple[int, StageChunk]] = []
        for s in mine:
            self.chunks.append((s, StageChunk(
                self, bb, KeptLayers({i: owned[i] for i in ranges[s]}),
                embed=bb.embed_tokens if s == 0 else None,
                norm=bb.norm if s == self.last_stage else None,
                lm_head=causal.lm_head if s == self.last_stage else None,
            )))
        # The training schedule's last stage stops before the lm_head, which _loss applies.
        self.train_chunks = [(s, c if s != self.last_stage else StageChunk(
            self, bb, c.layers, embed=c.embed, norm=c.norm, lm_head=None)) for s, c in self.chunks]
        self._lm_head = causal.lm_head
        self.has_first = 0 in mine
        self.has_last = self.last_stage in mine
        self.layer_ranges = {s: ranges[s] for s in mine}
        if source.loads_in_parts:
            source.load(model, self.env.device)

        self._hf_config = causal.config
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(
                f"pipeline stage {self.pp_rank} (layers {', '.join(str(list(r)) for r in self.layer_ranges.values())}) "
                f"has no trainable parameter under method={self.cfg.method.name}; every stage needs "
                f"one. Target modules present in every layer, or use fewer stages."
            )
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._schedules: OrderedDict = OrderedDict()
        self._ce_sums: list[float] = []
        self._n_targets = 1
        self._eval_model = PipelineEvalModel(self, model)
        if self.env.is_main:
            log.info("pipeline: %d stages x %d data-parallel, schedule %s, %d micro-batches of %d rows; layers %s",
                     self.stages, self.dp_world, self.cfg.parallel.schedule, self.cfg.parallel.microbatches,
                     self.cfg.train.micro_batch_size * self.cfg.train.grad_accum // self.cfg.parallel.microbatches,
                     " | ".join(f"{r.start}-{r.stop - 1}" for r in ranges))
        return model

    @property
    def inner(self) -> nn.Module:
        """The whole (peft) model's structure on the meta device (no memory): what the
        shared code uses for parameter counts and for `save_pretrained(state_dict=...)`
        at export. PEFT picks adapter keys by visiting the model's adapter layers, so a
        pruned stage would export only its own layers."""
        if getattr(self, "_skeleton", None) is None:
            self._skeleton = self._build_skeleton()
        return self._skeleton

    def _build_skeleton(self) -> nn.Module:
        import copy

        from omegaconf import OmegaConf
        from transformers import AutoModelForCausalLM

        from trainers.model.peft_methods import apply_method

        config = copy.deepcopy(self._hf_config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the skeleton mirrors names, not 4-bit storage
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=self.cfg.model.trust_remote_code)
        method = OmegaConf.merge(self.cfg.method, {"quantize": None})
        return apply_method(model, method)

    def expected_state_line(self) -> str:
        return super().expected_state_line().replace("per rank", f"on rank 0 (stage 0 of {self.n_chunks})", 1)

    # ------------------------------------------------------------------- schedules
    def _schedule(self, train: bool, batch: dict):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        rows, width = batch["input_ids"].shape
        kw = tuple(k for k in ("attention_mask", "position_ids") if k in batch)
        n_micro = self.cfg.parallel.microbatches if train else max(
            d for d in range(1, min(rows, self.cfg.parallel.microbatches) + 1) if rows % d == 0)
        key = (train, rows, width, kw)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        device = self.env.device
        chunks = self.train_chunks if train else self.chunks
        stages = [PipelineStage(chunk, s, self.n_chunks, device, group=self.pp_group) for s, chunk in chunks]
        loss_fn = self._loss if train else None
        kind = self.cfg.parallel.schedule
        if kind == "interleaved_1f1b":
            sched = ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss_fn, scale_grads=False)
        elif kind == "1f1b" and train:
            sched = Schedule1F1B(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
        else:  # gpipe, and every forward-only pass of a single-stage schedule
            sched = ScheduleGPipe(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)
        self._schedules[key] = sched
        while len(self._schedules) > MAX_CACHED_SCHEDULES:
            self._schedules.popitem(last=False)
        return sched

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            ce = lm_ce_sum(lambda: self._lm_head(hidden), labels)
        self._ce_sums.append(float(ce.detach()))
        return ce / self._n_targets

    def _run(self, sched, batch: dict, train: bool):
        kwargs = {k: batch[k].to(self.env.device) for k in ("attention_mask", "position_ids") if k in batch}
        args = (batch["input_ids"].to(self.env.device),) if self.has_first else ()
        if train:
            target = batch["labels"].to(self.env.device) if self.has_last else None
            return sched.step(*args, target=target, return_outputs=False, **kwargs)
        out = sched.step(*args, **kwargs)
        return out if self.has_last else None

    # ------------------------------------------------------------------- train step
    def forward_backward(self, micro_batches: list[dict], n_targets: int, objective) -> tuple[float, int, dict]:
        batch = stack_micro_batches(micro_batches)
        self._n_targets = n_targets
        self._ce_sums = []
        self._run(self._schedule(True, batch), batch, train=True)
        self._sync_dp_grads()
        if self.has_last:
            # The first step of a new shape also calls loss_fn once on placeholder tensors
            # (the schedule's shape inference): keep only the real micro-batches' sums.
            real = self._ce_sums[-self.cfg.parallel.microbatches :]
            return math.fsum(real), batch["n_real_tokens"], {}
        return 0.0, 0, {}

    def _grads(self) -> list[torch.Tensor]:
        for p in self._trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self._trainable]

    def _sync_dp_grads(self) -> None:
        """Sum gradients over the data-parallel replicas of this stage: each replica's loss
        is already its share of the global mean, so the sum is the global gradient."""
        if self.dp_world == 1:
            return
        grads = self._grads()
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self) -> torch.Tensor:
        """Clip by the norm over the whole model: squared norms summed over the stages."""
        grads = [p.grad for p in self._trainable if p.grad is not None]
        local = torch.stack([torch.linalg.vector_norm(g) for g in grads] or [torch.zeros(())]).pow(2).sum()
        dist.all_reduce(local, group=self.pp_group)
        total = local.sqrt()
        coef = torch.clamp(self.cfg.optim.max_grad_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    # -------------------------------------------------------------------- eval path
    @property
    def eval_model(self) -> nn.Module:
        return self._eval_model

    @torch.no_grad()
    def forward_only(self, batch: dict) -> torch.Tensor | None:
        """Logits of `batch` on the last stage (None elsewhere); every rank of the
        pipeline group calls this together."""
        return self._run(self._schedule(False, batch), batch, train=False)

    def broadcast_from_last(self, t: torch.Tensor | None) -> torch.Tensor:
        """`t` from the last stage's rank to the whole pipeline group (logits as float32,
        or token ids); what other ranks pass is ignored."""
        src = self._global_rank(self.last_stage % self.stages)
        if self.has_last:
            t = t.float() if t.is_floating_point() else t
            meta = [tuple(t.shape), t.dtype]
        else:
            meta = [None, None]
        dist.broadcast_object_list(meta, src=src, group=self.pp_group)
        if not self.has_last:
            t = torch.empty(meta[0], dtype=meta[1], device=self.env.device)
        dist.broadcast(t.contiguous() if self.has_last else t, src=src, group=self.pp_group)
        return t

    # ------------------------------------------------------------------ checkpoints
    # Optimizer param_groups name different parameters on every stage: flatten them to
    # per-parameter keys so DCP never merges two stages' lists under one key.
    _sd_options = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)

    def export_tensors(self, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Every stage's parameters (one dp replica) under the unsplit model's names, one
        tensor at a time: rank 0 gives its own, then receives each other stage's tensors
        in the order that stage lists them (collective: every rank iterates to the end)."""
        local = {}
        if self.dp_rank == 0:
            local = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=trainable_only))
        listing = [(k, tuple(v.shape), v.dtype) for k, v in local.items()]
        listings = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(listing, listings, dst=0)
        if not self.env.is_main:
            for key, value in local.items():
                dist.send(value.detach().to(self.env.device).contiguous(), dst=0)
                yield key, None
            return
        for key, value in local.items():
            yield key, value.detach().cpu()
        for src in range(1, self.env.world_size):
            for key, shape, dtype in listings[src]:
                value = torch.empty(shape, dtype=dtype, device=self.env.device)
                dist.recv(value, src=src)
                yield key, value.cpu()

    def close(self) -> None:
        self._schedules.clear()
        super().close()
