"""The training loop behind `dbrx train`: next-token prediction (plus the load-balancing loss) on a mix of MDS
streams, with checkpoints that resume exactly.

A step: draw the global batch -> for each micro-batch, forward under the configured precision and backward of
(sum of token losses / tokens in the whole batch + moe_loss_weight * load-balancing loss * micro-batch share)
-> clip the gradient norm -> AdamW -> schedule. Dividing by the whole batch's token count makes gradient
accumulation give the same update as one big batch.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dbrx.checkpoint import CheckpointError
from dbrx.config import DbrxConfig
from dbrx.data import finetuning
from dbrx.data.mds import MDSReader
from dbrx.data.mixture import (
    MixtureLoader, Phase, batches_per_epoch, eval_batches, open_streams, unigram_entropy,
)
from dbrx.fileio import atomic_path, atomic_write_text
from dbrx.model import DbrxForCausalLM
from dbrx.moe import router_statistics
from dbrx.parallel import Dist, parallel_config, parallelize
from dbrx.parallel.checkpoint import is_sharded, load_sharded, load_single_process, save_sharded
from dbrx.parallel.plan import memory_plan
from dbrx.perf import choose_training_precision, keep_freed_memory, machine_profile
from dbrx.train.budget import plan_steps
from dbrx.train.config import ConfigError, Time
from dbrx.train.loss import chunked_cross_entropy_sum

CHECKPOINTS = "checkpoints"


class TrainingError(RuntimeError):
    """The run cannot continue (a non-finite loss, say); the message says what and where to resume from."""


# ---- building blocks ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def training_layout(model: DbrxForCausalLM) -> DbrxForCausalLM:
    """Row-major lm_head for training: see relayout_lm_head (the fused AdamW kernel is slow on column-major
    tensors)."""
    model.relayout_lm_head(column_major=False)
    return model


def model_config(model_cfg: dict) -> DbrxConfig:
    """The model's config from `model: {preset: NAME, <config fields>...}` or `model: {pretrained: DIR}` (its
    config.json), before any weight exists."""
    model_cfg = dict(model_cfg)
    if isinstance(model_cfg.get("ffn_config"), dict) and "moe_world_size" in model_cfg["ffn_config"]:
        # LLM Foundry's expert-parallel degree: a parallelism setting (dbrx.parallel), not part of the model
        model_cfg["ffn_config"] = {k: v for k, v in model_cfg["ffn_config"].items() if k != "moe_world_size"}
    pretrained, preset = model_cfg.pop("pretrained", None), model_cfg.pop("preset", None)
    model_cfg.pop("peft_config", None)
    model_cfg.pop("name", None)  # LLM Foundry names the model class here; there is only one
    if pretrained is not None:
        if model_cfg or preset:
            raise ConfigError("model.pretrained loads a checkpoint as it is; drop the other model keys "
                              f"({', '.join(sorted(model_cfg) + (['preset'] if preset else []))})")
        try:
            config = DbrxConfig.from_pretrained(pretrained)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.pretrained: {e}") from None
        q = config.quantization_config
        if q is not None:
            raise ConfigError(f"model.pretrained: {pretrained} holds weights quantised to int{q['bits']} by dbrx "
                              "quantize, which are for inference; train or fine-tune (LoRA included) from the "
                              "unquantised checkpoint it was made from")
        return config
    try:
        return (DbrxConfig.from_name(preset) if preset else DbrxConfig()).replace(**model_cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def build_model(model_cfg: dict, max_seq_len: int, device: torch.device, seed: int = 0) -> DbrxForCausalLM:
    """`model: {preset: NAME, <config fields>...}` or `model: {pretrained: DIR}`, either with an optional
    `peft_config` (LoRA: only the adapters train; their initial values come from `seed`, so that every world size
    starts from the same ones). On the meta device the model has its shapes only: a sharded run reads or draws the
    weights after sharding (dbrx.parallel.checkpoint.load_pretrained_sharded, dbrx.parallel.init.init_sharded)."""
    config = model_config(model_cfg)
    pretrained, peft = model_cfg.get("pretrained"), model_cfg.get("peft_config")
    if pretrained is not None and device.type != "meta":
        try:
            model = DbrxForCausalLM.from_pretrained(pretrained, dtype=torch.float32, device=device)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.pretrained: {e}") from None
    else:  # built without drawing, then initialised from the seed (a sharded run draws the same values)
        with torch.device("meta"):
            model = DbrxForCausalLM(config)
        if device.type != "meta":
            model.to_empty(device=device)
            model.init_weights(seed=seed)
    if max_seq_len > model.config.max_seq_len:
        raise ConfigError(f"max_seq_len ({max_seq_len}) exceeds the model's max_seq_len "
                          f"({model.config.max_seq_len}); set model.max_seq_len")
    training_layout(model)
    if peft is not None:
        from dbrx.lora import LoraConfig, apply_lora

        try:
            apply_lora(model, LoraConfig.from_dict(peft, "model.peft_config"), torch.Generator().manual_seed(seed))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model.train()


def build_optimizer(model: torch.nn.Module, opt: dict) -> torch.optim.Optimizer:
    """AdamW (fused) over the trainable parameters. `lr_multipliers: {name prefix: factor}` (a dbrx extension)
    gives some parameters their own lr, e.g. `{transformer.wte: 30}`: the embedding rows of a 100k vocabulary are
    each updated only when their token occurs, and learn far faster with a larger step."""
    lr, wd = float(opt["lr"]), float(opt.get("weight_decay", 0.0))
    decoupled = opt["name"] == "decoupled_adamw"
    multipliers = {str(k): float(v) for k, v in (opt.get("lr_multipliers") or {}).items()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # with LoRA, the adapters only
    groups: dict[float, list[torch.nn.Parameter]] = {}
    used = set()
    for name, p in named:
        factor = 1.0
        for prefix, f in multipliers.items():
            if name == prefix or name.startswith(prefix + "."):
                factor = f
                used.add(prefix)
        groups.setdefault(factor, []).append(p)
    unused = set(multipliers) - used
    if unused:
        raise ConfigError(f"optimizer.lr_multipliers: {', '.join(sorted(unused))} names no trainable parameter "
                          "(give a module or parameter name such as transformer.wte or lm_head)")
    param_groups = []
    for factor, params in sorted(groups.items(), key=lambda kv: kv[0] != 1.0):  # the base lr's group first (logged)
        group_lr = lr * factor
        # Composer's DecoupledAdamW decays by weight_decay * lr / initial_lr; torch's AdamW by lr * weight_decay.
        group_wd = wd / group_lr if decoupled and group_lr > 0 else wd
        param_groups.append({"params": params, "lr": group_lr, "weight_decay": group_wd})
    # The fused kernel updates all parameters in one pass: about 2x faster than foreach on CPU.
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(opt.get("betas", (0.9, 0.95))),
                             eps=float(opt.get("eps", 1e-8)), weight_decay=wd, fused=True)


def lr_multiplier(name: str, warmup: int, total: int, alpha_f: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "constant_with_warmup":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear_decay_with_warmup":
            return 1.0 + (alpha_f - 1.0) * frac
        return alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine_with_warmup
    return f


def expert_shares(router_logits: list[torch.Tensor], top_k: int, num_experts: int) -> tuple[float, float]:
    """The busiest and idlest expert's share of routed token copies, over all layers."""
    with torch.no_grad():
        chosen = torch.cat([lg.topk(top_k, dim=-1).indices.reshape(-1) for lg in router_logits])
        counts = torch.bincount(chosen, minlength=num_experts).float()
        share = counts / counts.sum()
    return share.max().item(), share.min().item()


def _rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": json.loads(json.dumps(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


def _phase_duration(text, where: str) -> Time:
    t = Time.parse(text, where)
    if t.unit not in ("ba", "tok", "ep", "sp"):
        raise ConfigError(f"{where}: a curriculum phase lasts a number of batches, tokens, epochs or samples, "
                          f"not {t}")
    return t


# ---- the trainer -------------------------------------------------------------------------------------------------
class Trainer:
    # A wall-clock budget fixes the count from the median of PROBE_STEPS timed steps, after WARMUP_STEPS untimed
    # ones: the first steps are slower (allocations, matmul kernels built for new shapes as routing settles).
    PROBE_STEPS = 10
    WARMUP_STEPS = 5

    def __init__(self, cfg: dict, log=print, dist: Dist | None = None):
        """`dist`: this process's place in a torchrun job (dbrx.parallel.init_distributed); None or world size 1
        is the single-process path. Every rank builds the same model from the same seed, then shards it."""
        self._t0 = time.perf_counter()  # a wall-clock max_duration counts from here
        self.dist = dist or Dist()
        self.cfg, self.log = cfg, (log if self.dist.is_main else (lambda *a, **k: None))
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])
        self.device = resolve_device(cfg["device"])
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.memory_kept = self.device.type == "cpu" and keep_freed_memory()
        self.seq_len = cfg["max_seq_len"]
        self.batch_size = cfg["global_train_batch_size"]
        self.micro = cfg["device_train_microbatch_size"]
        self.precision = choose_training_precision(cfg["precision"], self.device, log)
        self.amp = self.precision == "amp_bf16"
        self.save_folder = Path(cfg["save_folder"]) if cfg.get("save_folder") else None

        config = model_config(cfg["model"])
        self.parallel = parallel_config(cfg, self.dist.world_size, config.num_experts, self.log)
        self._refuse_what_cannot_fit(config, lora=cfg["model"].get("peft_config") is not None)
        # A sharded run builds the model on the meta device and shards it; then each rank reads only its own pieces
        # of a pretrained checkpoint, or draws a preset's initial weights one parameter at a time and keeps its
        # pieces (no rank ever holds the whole model). Either way, the weights a one-process run starts from.
        self.model = build_model(cfg["model"], self.seq_len, torch.device("meta") if self.dist.enabled else self.device,
                                 seed=cfg["seed"])
        if self.batch_size % self.dist.world_size:
            raise ConfigError(f"global_train_batch_size ({self.batch_size}) must be a multiple of the world size "
                              f"({self.dist.world_size}): each rank takes an equal share of every batch")
        if self.dist.enabled:
            parallelize(self.model, self.dist, self.parallel, self.device)
            self.model.to_empty(device=self.device)
            if "pretrained" in cfg["model"]:
                from dbrx.parallel.checkpoint import load_pretrained_sharded

                load_pretrained_sharded(self.model, cfg["model"]["pretrained"], seed=cfg["seed"])
            else:
                from dbrx.parallel.init import init_sharded

                init_sharded(self.model, seed=cfg["seed"])
            self.log(f"{self.dist.world_size} processes ({self.dist.backend}): {self.parallel.describe()}")
        self._choose_attention_dtype()
        self.finetuning = (cfg["train_loader"].get("name") or "text") == "finetuning"
        self.loader = self._build_finetuning_loader() if self.finetuning else self._build_loader()
        self.eval_reader = self._build_eval_reader()
        self.icl = self._check_icl_tasks()

        self.per_epoch = (self.loader.batches_per_epoch() if self.finetuning
                          else batches_per_epoch(self.loader.phases, self.batch_size))
        self.duration = Time.parse(cfg["max_duration"], "max_duration")
        if self.duration.unit == "dur":
            raise ConfigError("max_duration: 'dur' is a fraction of max_duration itself; give batches, tokens, "
                              "epochs, samples or a wall-clock budget such as 9min")
        self.intervals = {key: Time.parse(cfg[key], key) if cfg.get(key) else None
                          for key in ("eval_interval", "save_interval", "console_log_interval")}
        for key, t in self.intervals.items():
            if t is not None and t.wall_clock:
                raise ConfigError(f"{key}: {t} is wall-clock time, which only max_duration takes; give a fraction "
                                  "of the run instead, e.g. 0.25dur")
        sched = cfg["scheduler"]
        self.warmup_time = Time.parse(sched.get("t_warmup", "0ba"), "scheduler.t_warmup")
        if self.duration.wall_clock and self.warmup_time.unit == "dur":
            raise ConfigError(f"scheduler.t_warmup: {self.warmup_time} is a fraction of a run whose length a "
                              f"wall-clock max_duration ({cfg['max_duration']}) only fixes after the first steps; "
                              "give the warm-up in batches (e.g. 30ba) or tokens")
        self.budget_s = self.duration.value if self.duration.wall_clock else None
        self._sized_here = False  # set when this run fixes its own count from a timing (size_to_budget)
        self._logged_count = 0  # the count last logged (re-plans that change it by under 1% are not logged)
        self._eval_s = self._save_s = self._export_s = 0.0  # measured costs a budget plans with
        self.max_steps: int | None = None  # with a wall-clock budget, fixed after the first steps (fix_step_count)
        self.eval_every = self.save_every = self.log_every = None
        self.warmup = 1 if self.warmup_time.unit == "dur" else self._to_batches(self.warmup_time, "scheduler.t_warmup")
        if not self.duration.wall_clock:
            self.fix_step_count(self._to_batches(self.duration, "max_duration"))

        self.optimizer = build_optimizer(self.model, cfg["optimizer"])
        alpha_f = float(sched.get("alpha_f", 0.0))
        # Read at every step, so that the count fixed by a wall-clock budget (or a resume) is the one it uses;
        # before then, warm-up steps are exact and a step past them sees the peak of the schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(sched["name"], self.warmup, self.max_steps or 2**62,
                                                       alpha_f)(step))
        clip = cfg["algorithms"].get("gradient_clipping") or {}
        self.clip_norm = float(clip.get("clipping_threshold", 1.0)) if clip else None

        self.step, self.metrics_rows, self._started = 0, [], False
        self.tb = self._tensorboard()
        mc = self.model.config
        active = self.model.num_parameters(active=True) - mc.vocab_size * mc.d_model  # lookups are not FLOPs
        self.flops_per_token = 6 * active + 12 * mc.n_layers * mc.d_model * self.seq_len
        profile = machine_profile(self.device)
        self.peak_flops = profile.bf16_flops if self.amp else profile.fp32_flops

    # ---- construction helpers ---------------------------------------------------------------------------------
    def _choose_attention_dtype(self) -> None:
        """Under bf16 autocast on a CPU, attention runs in fp32 where that measures faster at this run's shape
        (torch's CPU flash attention is several times slower in bf16 than in fp32 on a Xeon with AMX)."""
        if not (self.amp and self.device.type == "cpu"):
            return
        from dbrx.perf import sdpa_upcast_is_faster

        c = self.model.config
        faster, fp32_ms, bf16_ms = sdpa_upcast_is_faster(self.micro, c.n_heads, c.kv_n_heads, self.seq_len,
                                                         c.head_dim)
        if faster:
            self.model.set_attention_dtype(torch.float32)
        self.log(f"attention under amp_bf16: {'fp32' if faster else 'bf16'} (forward + backward at this shape: "
                 f"fp32 {fp32_ms:.1f} ms, bf16 {bf16_ms:.1f} ms)")

    def _refuse_what_cannot_fit(self, config: DbrxConfig, lora: bool) -> None:
        """The memory plan (dbrx.parallel.plan) from the model's shape, before anything is allocated: a run that
        cannot fit on its device is refused with the plan's table."""
        pcfg = self.parallel
        if self.device.type == "cuda":
            device_bytes = torch.cuda.get_device_properties(self.device).total_memory
        else:
            from dbrx.checkpoint import available_memory_bytes

            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            device_bytes = available_memory_bytes() / max(1, local)
        plan = memory_plan(config, self.dist.world_size, pcfg.ep, seq=self.seq_len, micro_batch=self.micro,
                           activation_checkpointing=pcfg.activation_checkpointing,
                           param_dtype=pcfg.param_dtype or torch.float32, device_bytes=device_bytes,
                           frozen_base=lora)
        if not plan.fits:
            raise ConfigError(f"this run needs about {plan.total / 1e9:,.1f} GB per device and the device has "
                              f"{device_bytes / 1e9:,.1f} GB; nothing was allocated. The plan:\n{plan.table()}\n"
                              "Add processes (torchrun --nproc_per_node / --nnodes), expert parallelism "
                              "(parallelism.expert_parallel_degree), fsdp_config.activation_checkpointing: true or "
                              "a smaller device_train_microbatch_size (dbrx plan shows the options)")

    def _to_batches(self, t: Time, key: str, total: int | None = None) -> int:
        """Batches in a duration; `dur` (a fraction of the run) needs the run's step count `total`."""
        per_batch = self.batch_size * self.seq_len
        if t.unit == "ba":
            n = t.value
        elif t.unit == "ep":
            n = t.value * self.per_epoch
        elif t.unit == "sp":
            n = t.value / self.batch_size
        elif t.unit == "dur":
            if total is None:
                raise ConfigError(f"{key}: {t} needs the run's length, which is not known yet")
            n = t.value * total
        elif t.unit == "tok":
            n = t.value / per_batch
        else:
            raise ConfigError(f"{key}: {t} is wall-clock time, which only max_duration takes")
        return max(1, math.ceil(n))

    def intervals_for(self, total: int) -> tuple[int | None, int | None, int]:
        """(eval_every, save_every, log_every) in batches for a run of `total` steps."""
        every = {key: None if t is None else self._to_batches(t, key, total) for key, t in self.intervals.items()}
        return every["eval_interval"], every["save_interval"], every["console_log_interval"] or 10

    def fix_step_count(self, total: int, keep_intervals: bool = False) -> None:
        """The run's length in steps, and what follows from it: the intervals given as fractions of the run (unless
        `keep_intervals`) and the schedule (which reads self.max_steps)."""
        self.max_steps = total
        if not keep_intervals:
            self.eval_every, self.save_every, self.log_every = self.intervals_for(total)
        self.warmup = self._to_batches(self.warmup_time, "scheduler.t_warmup", total)
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:  # the next step's lr, which the scheduler set from the count before this one
            for group, base, lam in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * lam(scheduler.last_epoch)

    def _build_loader(self) -> MixtureLoader:
        tl = self.cfg["train_loader"]
        dataset = tl.get("dataset") or {}
        phases = [Phase(open_streams(dataset, "train_loader.dataset"), None)]
        curriculum = (self.cfg.get("callbacks") or {}).get("curriculum_learning")
        if curriculum:
            phases[0].duration = _phase_duration(curriculum["duration"], "callbacks.curriculum_learning.duration")
            for i, entry in enumerate(curriculum.get("schedule") or []):
                where = f"callbacks.curriculum_learning.schedule[{i}]"
                if not isinstance(entry, dict) or "duration" not in entry:
                    raise ConfigError(f"{where}: expected {{duration, dataset: {{streams: ...}}}}")
                ds = entry.get("dataset") or (entry.get("train_loader") or {}).get("dataset")
                if not ds:
                    raise ConfigError(f"{where}: needs a 'dataset' (or 'train_loader.dataset') with its streams")
                phases.append(Phase(open_streams(ds, f"{where}.dataset"), _phase_duration(entry["duration"], where)))
            phases[-1].duration = None
        return MixtureLoader(phases, self.batch_size, self.seq_len, seed=self.cfg["seed"],
                             shuffle=dataset.get("shuffle", True))

    def _finetuning_examples(self, section: str) -> list[finetuning.Example]:
        from dbrx.tokenizer import Tokenizer

        dataset = self.cfg[section].get("dataset") or {}
        where = f"{section}.dataset"
        if int(dataset.get("max_seq_len") or self.seq_len) > self.seq_len:
            raise ConfigError(f"{where}.max_seq_len ({dataset['max_seq_len']}) exceeds max_seq_len ({self.seq_len})")
        try:
            examples = finetuning.prepare(dataset, Tokenizer(), self.seq_len, where, log=self.log)
        except finetuning.FinetuningDataError as e:
            raise ConfigError(str(e)) from None
        top = max(int(e.input_ids.max()) for e in examples)
        if top >= self.model.config.vocab_size:
            raise ConfigError(f"{where}: token id {top} is outside the model's vocabulary "
                              f"({self.model.config.vocab_size}); DBRX's tokenizer needs vocab_size 100352")
        return examples

    def _packing_ratio(self, section: str, examples: list[finetuning.Example]) -> float:
        ratio = (self.cfg[section].get("dataset") or {}).get("packing_ratio")
        if ratio is None:
            return 1.0
        if ratio == "auto":
            ratio = finetuning.auto_packing_ratio([len(e) for e in examples], self.batch_size, self.seq_len,
                                                  self.cfg["seed"])
            self.log(f"{section}.dataset.packing_ratio: auto chose {ratio:g}")
            return ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1:
            raise ConfigError(f"{section}.dataset.packing_ratio: expected a number >= 1 or 'auto', got {ratio!r}")
        return float(ratio)

    def _build_finetuning_loader(self) -> finetuning.FinetuningLoader:
        examples = self._finetuning_examples("train_loader")
        dataset = self.cfg["train_loader"].get("dataset") or {}
        return finetuning.FinetuningLoader(examples, self.batch_size, self.seq_len,
                                           seed=dataset.get("shuffle_seed", self.cfg["seed"]),
                                           shuffle=dataset.get("shuffle", True),
                                           packing_ratio=self._packing_ratio("train_loader", examples))

    def _build_eval_reader(self) -> MDSReader | list[finetuning.Example] | None:
        """The held-out set: an MDS reader of token windows, or (finetuning) the validated examples."""
        el = self.cfg.get("eval_loader")
        if not el:
            return None
        if (el.get("name") or "text") == "finetuning":
            return self._finetuning_examples("eval_loader")
        streams = open_streams(el.get("dataset") or {}, "eval_loader.dataset")
        if len(streams) != 1:
            raise ConfigError("eval_loader.dataset: give one dataset (local/remote/split), not streams")
        return streams[0].reader

    def _check_icl_tasks(self):
        """icl_tasks (dbrx.eval, Foundry's keys): parsed and their files found before training starts."""
        if not self.cfg.get("icl_tasks"):
            return None
        self._allow_code = bool(self.cfg.get("allow_code_execution"))
        from dbrx.eval import EvalError, check_tasks

        self.icl_cfg = {"icl_tasks": self.cfg["icl_tasks"], "eval_gauntlet": self.cfg.get("eval_gauntlet"),
                        "max_seq_len": self.cfg.get("icl_seq_len") or self.seq_len,
                        "device_eval_batch_size": self.cfg["device_eval_batch_size"],
                        "icl_subset_num_batches": self.cfg.get("icl_subset_num_batches"),
                        "dataset_root": self.cfg.get("dataset_root"), "seed": self.cfg["seed"]}
        try:
            return check_tasks(self.icl_cfg, log=self.log, allow_code_execution=self._allow_code)
        except EvalError as e:
            raise ConfigError(f"icl_tasks: {e}") from None

    def _evaluate_icl(self) -> dict[str, float]:
        """Every icl_task on the model being trained (each rank runs the same forwards, as sharded models
        need): Foundry's metric names, and the Gauntlet's icl/metrics/eval_gauntlet/* where one is given."""
        from dbrx.eval import evaluate
        from dbrx.tokenizer import Tokenizer

        quiet = lambda *a, **k: None  # noqa: E731 (the summary line is the trainer's)
        with self._autocast():
            result = evaluate(self.model, Tokenizer(), self.icl_cfg, log=quiet, tasks=self.icl,
                              allow_code_execution=self._allow_code)
        self.model.train()
        scores = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        scores.update({k: v for k, v in (result.get("gauntlet") or {}).items()
                       if k.startswith("icl/") and isinstance(v, (int, float))})
        return scores

    @property
    def has_evaluation(self) -> bool:
        return self.eval_reader is not None or self.icl is not None

    def _tensorboard(self):
        tb = (self.cfg.get("loggers") or {}).get("tensorboard")
        if tb is None or not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("loggers.tensorboard needs the tensorboard package: pip install tensorboard") from None
        log_dir = tb.get("log_dir") or (self.save_folder / "tensorboard" if self.save_folder else "runs/tensorboard")
        return SummaryWriter(log_dir=str(log_dir))

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ---- one step ---------------------------------------------------------------------------------------------
    def micro_batch_loss(self, input_ids, labels, sequence_id=None):
        """(sum of token losses, load-balancing loss, router logits) for one micro-batch. Packed rows carry
        sequence_id (each token's example; -1 on padding)."""
        with self._autocast():
            h, router_logits = self.model.hidden_states(input_ids, sequence_id=sequence_id)
            loss_sum = chunked_cross_entropy_sum(
                h, self.model.lm_head.weight, labels,
                compute_dtype=torch.bfloat16 if self.amp else self.model.lm_head.weight.dtype)
        return loss_sum, self.load_balancing(router_logits), router_logits

    def load_balancing(self, router_logits: list[torch.Tensor]) -> torch.Tensor:
        """The load-balancing loss of the tokens all ranks route in this micro-step, from all-reduced expert counts
        (a per-rank loss would balance each rank's tokens instead, and drift from the one-process run). Each rank
        returns its share: the shares sum to the global loss, and so do their gradients once FSDP sums them."""
        f = self.model.config.ffn_config
        counts_E, prob_sums_E, rows = router_statistics(router_logits, f.moe_num_experts, f.moe_top_k)
        if self.dist.enabled:
            stats = self.dist.all_reduce(torch.cat([counts_E, rows.reshape(1)]).detach())
            counts_E, rows = stats[:-1], stats[-1]
        return f.moe_num_experts * ((counts_E / rows) * (prob_sums_E / rows)).sum()

    def _local_rows(self, batch: dict, rows: int) -> dict:
        """This rank's equal share of a batch of `rows` rows (the whole batch in a single process)."""
        if not self.dist.enabled:
            return batch
        share = rows // self.dist.world_size
        lo = self.dist.rank * share
        return {k: v[lo:lo + share] if torch.is_tensor(v) and v.ndim and v.shape[0] == rows else v
                for k, v in batch.items()}

    def backward_batch(self, batch: dict) -> tuple[float, float, list[torch.Tensor]]:
        """Accumulate the global batch's gradient over micro-batches; returns (mean token loss, load-balancing
        loss, the last micro-batch's router logits)."""
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())  # in the global batch: every rank divides by it
        local = self._local_rows(batch, batch["input_ids"].shape[0])
        ids, labels = local["input_ids"].to(self.device), local["labels"].to(self.device)
        seq = local["sequence_id"].to(self.device) if "sequence_id" in local else None
        weight = self.model.config.ffn_config.moe_loss_weight
        loss_total, aux_total = 0.0, 0.0
        for start in range(0, ids.shape[0], self.micro):
            mb_ids, mb_labels = ids[start:start + self.micro], labels[start:start + self.micro]
            mb_seq = None if seq is None else seq[start:start + self.micro]
            share = mb_ids.shape[0] / ids.shape[0]
            loss_sum, aux, router_logits = self.micro_batch_loss(mb_ids, mb_labels, mb_seq)
            loss_value, aux_value = self.dist.sum_floats(loss_sum.item(), aux.item())
            if not (math.isfinite(loss_value) and math.isfinite(aux_value)):  # the same verdict on every rank
                raise TrainingError(self._nonfinite_message(loss_value, aux_value))
            (loss_sum / max(1, n_tokens) + weight * aux * share).backward()
            loss_total += loss_value
            aux_total += aux_value * share
        return loss_total / max(1, n_tokens), aux_total, router_logits

    def train_step(self, batch: dict) -> dict:
        return self.apply_gradients(*self.backward_batch(batch))

    def apply_gradients(self, loss: float, aux: float, router_logits: list[torch.Tensor]) -> dict:
        """The rest of a step after backward_batch: the global gradient norm, clipping, AdamW, the schedule."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.dist.enabled:
            # Sharded gradients sit on two meshes with expert parallelism (dense weights over all ranks, experts
            # over ep x dp_mod_ep), and every rank holds a disjoint piece of each: the global norm is the square
            # root of all ranks' local sums of squares.
            local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
            squares = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in local]).sum().double()
            grad_norm = math.sqrt(self.dist.all_reduce(squares.reshape(1)).item())
        else:
            total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            grad_norm = total_norm.item()
        if not math.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient norm at step {self.step + 1}. " + self._resume_hint())
        # clip_grad_norm_ would also multiply every gradient by 1.0 when the norm is under the threshold: a pass
        # over 70M+ floats (the 100k-vocab head and embedding) for nothing.
        if self.clip_norm and grad_norm + 1e-6 > self.clip_norm:
            if self.dist.enabled:  # clip_grads_with_norm_'s coefficient, applied to each rank's pieces
                for g in local:
                    g.mul_(self.clip_norm / (grad_norm + 1e-6))
            else:
                torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, total_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        # With freed memory kept by the allocator (keep_freed_memory), dropping the gradients is cheapest: the next
        # backward's gradients become .grad as they are, with no zeroing and no accumulating add. Where the
        # allocator returns big buffers to the OS, fresh 100 MB gradients cost page faults every step, and
        # zeroing in place is faster.
        self.optimizer.zero_grad(set_to_none=self.memory_kept)
        self.step += 1
        top, low = expert_shares(router_logits, self.model.config.top_k, self.model.config.num_experts)
        return {"loss": loss, "lb_loss": aux, "lr": lr, "grad_norm": grad_norm,
                "expert_share_max": top, "expert_share_min": low}

    def _resume_hint(self) -> str:
        newest = self.newest_checkpoint()
        return (f"The last good checkpoint is {newest}; lower the learning rate or check the data, then resume "
                f"with autoresume: true." if newest else "No checkpoint was written before this step.")

    def _nonfinite_message(self, loss_sum, aux) -> str:
        return (f"non-finite loss at step {self.step + 1} (cross-entropy sum {loss_sum}, load-balancing "
                f"{aux}); stopped before updating the weights. " + self._resume_hint())

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval_reader is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self._eval_batches():
            loss_sum, n = self._eval_batch_loss(batch)
            total, count = total + loss_sum, count + n
        self.model.train()
        return total / max(1, count)

    def _eval_batches(self):
        limit = self.cfg.get("eval_subset_num_batches")
        size = self.cfg["device_eval_batch_size"]
        if isinstance(self.eval_reader, list):  # fine-tuning: the loss on the held-out responses
            return finetuning.eval_batches(self.eval_reader, size, self.seq_len,
                                           self.loader.packing_ratio if self.finetuning else 1.0, limit)
        return eval_batches(self.eval_reader, size, self.seq_len, limit)

    def _eval_batch_loss(self, batch: dict) -> tuple[float, int]:
        """(sum of token losses, tokens scored) of one eval batch; each rank scores its share of the rows."""
        rows = batch["input_ids"].shape[0]
        lo, hi = self.dist.rank * rows // self.dist.world_size, (self.dist.rank + 1) * rows // self.dist.world_size
        empty = hi == lo  # fewer rows than ranks: this rank still runs a forward (FSDP's gathers), and counts 0
        part = {k: v[lo:hi] if not empty else v[:1] for k, v in batch.items() if torch.is_tensor(v)}
        ids, labels = part["input_ids"].to(self.device), part["labels"].to(self.device)
        seq = part["sequence_id"].to(self.device) if "sequence_id" in part else None
        loss_sum, _, _ = self.micro_batch_loss(ids, labels, seq)
        local = (0.0, 0) if empty else (loss_sum.item(), int((labels[:, 1:] != -100).sum()))
        total, count = self.dist.sum_floats(*local)
        return total, int(count)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path:
        return self.save_folder / CHECKPOINTS

    def newest_checkpoint(self) -> Path | None:
        if self.save_folder is None or not self.checkpoint_dir().exists():
            return None
        done = sorted(p for p in self.checkpoint_dir().glob("ba*") if (p / "trainer_state.json").exists())
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        final = self.checkpoint_dir() / f"ba{self.step:08d}"
        tmp = self.checkpoint_dir() / f".ba{self.step:08d}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        if self.dist.enabled:  # each rank writes its shards (Distributed Checkpoint), nobody gathers the model
            save_sharded(self.model, self.optimizer, tmp)
            groups = None  # inside the shards
        else:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()},
                      tmp / "model.safetensors")
            opt = self.optimizer.state_dict()
            tensors = {f"{i}.{name}": t.detach().contiguous().cpu()
                       for i, st in opt["state"].items() for name, t in st.items() if torch.is_tensor(t)}
            save_file(tensors, tmp / "optimizer.safetensors")
            groups = opt["param_groups"]
        self.dist.barrier()  # every shard is written before the checkpoint is made visible
        if not self.dist.is_main:
            self.dist.barrier()
            self.export_hf()
            return final
        state = {
            "step": self.step,
            "scheduler_last_epoch": self.scheduler.last_epoch,
            "optimizer_param_groups": groups,
            "data": self.loader.state_dict(),
            "rng": _rng_state(),
            "run": {"max_steps": self.max_steps, "seq_len": self.seq_len, "batch_size": self.batch_size},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint exists only once it is complete
        keep = self.cfg.get("save_num_checkpoints_to_keep", -1)
        if keep and keep > 0:
            done = sorted(p for p in self.checkpoint_dir().glob("ba*") if p.is_dir())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        self.export_hf()
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        if state["run"]["seq_len"] != self.seq_len or state["run"]["batch_size"] != self.batch_size:
            raise ConfigError(f"{path}: written with max_seq_len {state['run']['seq_len']} and batch size "
                              f"{state['run']['batch_size']}; this run has {self.seq_len} and {self.batch_size}")
        if is_sharded(path):  # a sharded run's checkpoint, at any world size (DCP reshards)
            load_sharded(self.model, self.optimizer, path)
        elif self.dist.enabled:  # a single-process checkpoint into a sharded run: each rank keeps its shard
            load_single_process(self.model, self.optimizer, path, state["optimizer_param_groups"])
        else:
            weights = load_file(path / "model.safetensors", device=str(self.device))
            self.model.load_state_dict(weights)
            flat = load_file(path / "optimizer.safetensors", device=str(self.device))
            opt_state: dict = {}
            for key, t in flat.items():
                idx, name = key.split(".", 1)
                opt_state.setdefault(int(idx), {})[name] = t
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer_param_groups"]})
        # The fused AdamW kernel walks a parameter and its moments as flat memory: give every moment its
        # parameter's layout again (lm_head is column-major; checkpoints store tensors row-major).
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                for key, t in self.optimizer.state.get(param, {}).items():
                    if torch.is_tensor(t) and t.shape == param.shape and t.stride() != param.stride():
                        self.optimizer.state[param][key] = torch.empty_like(param).copy_(t)
        self.scheduler.last_epoch = state["scheduler_last_epoch"]
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.loader.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        if self.budget_s is not None and state["run"].get("max_steps"):
            # The count a wall-clock budget fixed stays the run's count: its schedule and intervals resume as
            # they were, whatever this machine's speed now.
            self.fix_step_count(state["run"]["max_steps"])
            self.log(f"max_duration {self.cfg['max_duration']}: the resumed run keeps its {self.max_steps:,} steps")

    def export_hf(self) -> None:
        """The newest model in Hugging Face format at SAVE_FOLDER/hf (swapped in whole when complete)."""
        from dbrx.tokenizer import Tokenizer

        from dbrx.lora import adapter_parameters, has_lora, merge_lora

        final, tmp = self.save_folder / "hf", self.save_folder / ".hf.tmp"
        if self.dist.enabled:  # written from the shards, each rank its share of the tensors
            from dbrx.parallel.export import export_from_shards, gathered

            if has_lora(self.model):  # the adapters are small: gathered whole, written by rank 0
                tensors = {name: gathered(p) for name, p in adapter_parameters(self.model).items()}
                if self.dist.is_main:
                    self._save_adapter(self.model, tensors)
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.dist.barrier()
            export_from_shards(self.model, self.dist, tmp)
            if self.dist.is_main:
                Tokenizer().save_pretrained(tmp)
                self._swap_in(tmp, final)
            self.dist.barrier()
            return
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model
        if has_lora(model):  # the adapters alone (peft's layout) beside a merged plain checkpoint
            self._save_adapter(model)
            model = merge_lora(copy.deepcopy(model))
        model.save_pretrained(tmp)
        Tokenizer().save_pretrained(tmp)
        self._swap_in(tmp, final)

    def _save_adapter(self, model: torch.nn.Module, tensors: dict | None = None) -> None:
        from dbrx.lora import LoraConfig, save_adapter

        peft = LoraConfig.from_dict(self.cfg["model"]["peft_config"])
        save_adapter(model, peft, self.save_folder / "adapter", self.cfg["model"].get("pretrained"), tensors)

    def _swap_in(self, tmp: Path, final: Path) -> None:
        old = self.save_folder / ".hf.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    # ---- logging ----------------------------------------------------------------------------------------------
    def _metrics_path(self) -> Path | None:
        return self.save_folder / "metrics.jsonl" if self.save_folder else None

    def _record(self, row: dict) -> None:
        self.metrics_rows.append(row)
        path = self._metrics_path()
        if path and self.dist.is_main:
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tb:
            for key, value in row.items():
                if key not in ("step", "tokens") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def _reload_metrics(self) -> None:
        """After a resume: keep the rows up to the checkpoint's step (a killed run may have logged past it)."""
        path = self._metrics_path()
        if not path or not path.exists():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.metrics_rows = [r for r in rows if r["step"] <= self.step]
        if self.dist.is_main:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.metrics_rows))

    def plot(self) -> None:
        if not self.save_folder or not self.dist.is_main:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["tokens"], r["loss"]) for r in self.metrics_rows if "loss" in r]
        evals = [(r["tokens"], r["eval_loss"]) for r in self.metrics_rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if train:
            ax.plot(*zip(*train), label="train", lw=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="held-out", lw=1.5)
        ax.set_xlabel("tokens")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(self.cfg.get("run_name") or "dbrx training")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(self.save_folder / "loss.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)

    # ---- a wall-clock budget ----------------------------------------------------------------------------------
    def size_to_budget(self, step_s: float, write=None) -> None:
        """Fix the step count so that the rest of the run (steps, evaluations, checkpoints, the final export)
        ends within max_duration of the trainer's start."""
        self._eval_s = self._time_evaluation() if self.eval_reader is not None else 0.0
        self._save_s, self._export_s = self._time_saving()
        plan = self._plan(step_s)
        self.fix_step_count(plan.steps)
        self._sized_here = True  # this run chose its count, and may re-plan it upwards (a resumed run keeps its own)
        self._logged_count = plan.steps
        (write or self.log)(plan.describe(self.budget_s, self.step))

    def keep_to_budget(self, step_s: float, write=None) -> None:
        """A budget is a limit, and the count is re-planned from the recent speed at every log row: where the
        machine has slowed down since the count was fixed (shared machines move by 10-40%), so that the count
        would overrun max_duration, it shrinks to what still fits; where it has sped up by enough that 2% more
        steps fit, it grows (not in a resumed run, which keeps the count it stored). The schedule follows; the
        evaluation and checkpoint intervals stay those of the count first fixed (and the last step has both). Two
        native runs whose count was fixed or shrunk in a slow spell otherwise ended 60-80 s early."""
        plan = self._plan(step_s)
        self._logged_count = self._logged_count or self.max_steps  # a resumed run: the count it stored
        if plan.steps < self.max_steps:
            if plan.steps < 0.99 * self._logged_count:  # said once per 1% of change, not at every log row
                (write or self.log)(f"running slower than timed ({step_s:.3f} s a step): {self._logged_count:,} -> "
                                    f"{plan.steps:,} steps, to end within max_duration {self.cfg['max_duration']}")
                self._logged_count = plan.steps
            self.fix_step_count(plan.steps, keep_intervals=True)
        elif plan.steps >= 1.02 * self.max_steps and self._sized_here:
            (write or self.log)(f"running faster than timed ({step_s:.3f} s a step): {self._logged_count:,} -> "
                                f"{plan.steps:,} steps, to use max_duration {self.cfg['max_duration']}")
            self._logged_count = plan.steps
            self.fix_step_count(plan.steps, keep_intervals=True)

    def _plan(self, step_s: float):
        reserve = 0.02 * self.budget_s + 1.0 + (self._export_s if self.save_folder and not self.save_every else 0.0)
        # Ranks time their own steps: all plan from the slowest figures, so that they fix the same count.
        elapsed, reserve, step_s, self._eval_s, self._save_s = self.dist.max_floats(
            time.perf_counter() - self._t0, reserve, step_s, self._eval_s, self._save_s)
        remaining = self.budget_s - elapsed - reserve

        # Once the count is fixed, re-plans keep the intervals it gave: an interval that moved with every re-plan
        # would evaluate again a few steps after it had (step % interval hits twice).
        sized = self.max_steps is not None

        def eval_every(total: int) -> int | None:
            if not self.has_evaluation:
                return None
            return self.eval_every if sized else self.intervals_for(total)[0]

        def save_every(total: int) -> int | None:
            if not self.save_folder:
                return None
            return self.save_every if sized else self.intervals_for(total)[1]

        return plan_steps(self.step, remaining, step_s, self._eval_s, self._save_s, eval_every, save_every)

    def _time_evaluation(self) -> float:
        """One evaluation's time, from one timed eval batch (after an untimed one) times the number of batches."""
        self.model.eval()
        batches = list(self._eval_batches())
        times = []
        with torch.no_grad():
            for batch in batches[:2]:
                t0 = time.perf_counter()
                self._eval_batch_loss(batch)
                times.append(time.perf_counter() - t0)
        self.model.train()
        return times[-1] * len(batches) if times else 0.0

    def _time_saving(self) -> tuple[float, float]:
        """(a checkpoint's time, the Hugging Face export's time), from a timed write of the model's weights: a
        checkpoint writes them twice (its own copy and the export) plus the optimizer's state."""
        if self.save_folder is None:
            return 0.0, 0.0
        from dbrx.tokenizer import Tokenizer

        Tokenizer()._tokenizer_json()  # built once per process (2 s), before the timing: later exports reuse it
        self.save_folder.mkdir(parents=True, exist_ok=True)
        # A sharded run's ranks each write their own shard: time that (to_local), each rank its own probe file.
        weights = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().contiguous().cpu()
                   for k, v in self.model.state_dict().items()}
        probe = self.save_folder / f".write_probe.{self.dist.rank}.safetensors"
        t0 = time.perf_counter()
        save_file(weights, probe)
        write_s = time.perf_counter() - t0
        probe.unlink()
        model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        opt_bytes = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                        for t in ((v.to_local() if hasattr(v, "to_local") else v) for v in st.values())
                        if torch.is_tensor(t))
        return write_s * (2 + opt_bytes / max(1, model_bytes)), write_s

    # ---- the loop ---------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to max_steps (continuing from where this trainer, or the newest checkpoint, stands)."""
        if not self._started:
            self._start()
        return self._loop()

    def _start(self) -> None:
        self._started = True
        if self.save_folder:
            if self.cfg.get("save_overwrite") and not self.cfg["autoresume"] and self.dist.is_main:
                # Start afresh in the same folder: remove what a run writes, and nothing else.
                for name in (CHECKPOINTS, "hf", "adapter", "tensorboard", "metrics.jsonl", "loss.png"):
                    target = self.save_folder / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
            self.save_folder.mkdir(parents=True, exist_ok=True)
            self.dist.barrier()  # rank 0 has cleared the folder
            newest = self.newest_checkpoint()
            if newest and not self.cfg["autoresume"]:
                raise ConfigError(f"{self.save_folder} already holds checkpoints (newest {newest.name}); set "
                                  "autoresume: true to continue that run, save_overwrite: true to start over, "
                                  "or use another save_folder")
            if newest:
                self.load_checkpoint(newest)
                self._reload_metrics()
                self.log(f"resumed from {newest} at step {self.step}")
            elif self._metrics_path().exists() and self.dist.is_main:
                self._metrics_path().unlink()
        mc = self.model.config
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        steps = f"{self.max_steps} steps" if self.max_steps else f"as many steps as fit in {self.cfg['max_duration']}"
        self.log(f"model: {self.model.num_parameters():,} parameters, {self.model.num_parameters(active=True):,} "
                 f"active" + (f", {trainable:,} trainable (LoRA)" if trainable < self.model.num_parameters() else "")
                 + f"; {mc.num_experts} experts top {mc.top_k}; tokens/step {self.batch_size * self.seq_len:,} "
                 f"({self.batch_size // self.micro} micro-batch(es) of {self.micro}); {steps}; precision "
                 f"{self.precision}; matmul peak {self.peak_flops / 1e9:,.1f} GFLOP/s on {self.device}")
        if self.cfg["eval_first"] and self.step == 0:
            self._eval_and_record()

    def _loop(self) -> dict:
        from tqdm import tqdm

        bar = tqdm(total=self.max_steps, initial=self.step, unit="ba",
                   disable=not (self.cfg["progress_bar"] and self.dist.is_main),
                   dynamic_ncols=True, file=sys.stderr)
        write = bar.write if self.dist.is_main else (lambda *a, **k: None)
        window_t, window_tokens = time.perf_counter(), 0
        last, step_times = {}, []
        while self.max_steps is None or self.step < self.max_steps:
            batch = self.loader.next_batch()
            t0 = time.perf_counter()
            last = self.train_step(batch)
            step_times.append(time.perf_counter() - t0)
            window_tokens += batch["input_ids"].numel()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            if self.budget_s is not None:  # time the first steps, then fix the count; later, keep to the budget
                paused = time.perf_counter()
                if self.max_steps is None:
                    if len(step_times) < self.WARMUP_STEPS + self.PROBE_STEPS:
                        continue
                    self.size_to_budget(statistics.median(step_times[self.WARMUP_STEPS:]), write)
                elif self.step % self.log_every == 0 and len(step_times) >= 2 * self.PROBE_STEPS:
                    self.keep_to_budget(statistics.median(step_times[-5 * self.PROBE_STEPS:]), write)
                window_t += time.perf_counter() - paused
                if bar.total != self.max_steps:
                    bar.total = self.max_steps
                    bar.refresh()
            if self.step % self.log_every == 0 or self.step == self.max_steps:
                seconds = time.perf_counter() - window_t
                tps = window_tokens / max(seconds, 1e-9)
                row = {"step": self.step, "tokens": self.loader.state["tokens"], **last, "tokens_per_s": tps,
                       "mfu": tps * self.flops_per_token / self.peak_flops, "phase": batch["phase"]}
                if self.finetuning:
                    row["packing_efficiency"] = self.loader.packing_efficiency()
                self._record(row)
                write(f"step {self.step}/{self.max_steps} | loss {row['loss']:.4f} | lb {row['lb_loss']:.3f} | "
                          f"lr {row['lr']:.2e} | gnorm {row['grad_norm']:.2f} | {tps:,.0f} tok/s | "
                          f"MFU {row['mfu']:.1%} | experts max {row['expert_share_max']:.1%} "
                          f"min {row['expert_share_min']:.1%}")
                window_t, window_tokens = time.perf_counter(), 0
            paused = time.perf_counter()
            if self.has_evaluation and (self.eval_every and self.step % self.eval_every == 0
                                        or self.step == self.max_steps):
                self._eval_and_record(write)
                self._eval_s = time.perf_counter() - paused  # what the budget plans with from now on
            if self.save_folder and self.save_every and (self.step % self.save_every == 0
                                                         or self.step == self.max_steps):
                t_save = time.perf_counter()
                path = self.save_checkpoint()
                self._save_s = time.perf_counter() - t_save
                write(f"saved {path}")
            window_t += time.perf_counter() - paused  # throughput counts training time only
        bar.close()
        if self.save_folder:
            if not self.save_every:
                self.export_hf()
            self.plot()
        if self.tb:
            self.tb.close()
        summary = {"step": self.step, "tokens": self.loader.state["tokens"], **last,
                   "eval_loss": next((r["eval_loss"] for r in reversed(self.metrics_rows) if "eval_loss" in r), None)}
        if not self.finetuning:
            summary["unigram_entropy"] = unigram_entropy([s.reader for s in self.loader.phases[0].streams])
        return summary

    def _eval_and_record(self, write=None) -> None:
        t0 = time.perf_counter()
        loss = self.evaluate()
        if loss is not None:
            self._record({"step": self.step, "tokens": self.loader.state["tokens"], "eval_loss": loss})
            (write or self.log)(f"eval at step {self.step}: held-out loss {loss:.4f} "
                                f"({time.perf_counter() - t0:.1f} s)")
        if self.icl is not None:
            t1 = time.perf_counter()
            scores = self._evaluate_icl()
            self._record({"step": self.step, "tokens": self.loader.state["tokens"], **scores})
            shown = {k.removeprefix("metrics/"): v for k, v in scores.items() if "/lm_eval_" not in k}
            (write or self.log)(f"icl at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                                + f" ({time.perf_counter() - t1:.1f} s)")
        self.plot()
