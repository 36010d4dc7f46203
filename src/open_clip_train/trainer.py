"""The training session: wires model, freezing plan, optimizer, data, loss and outputs.

Named steps, called by `main`: `Trainer.build` -> `resume` -> `fit` -> `close`. Inside `fit`,
every epoch starts with `enter_epoch`, which applies the freezing plan: unlocked params get
requires_grad, their own param groups (nothing else in the optimizer changes), and the DDP
wrapper is rebuilt, because DDP only hooks params that required grad when it was built.
Flipping requires_grad under a live wrapper would leave new params unsynchronised.
"""
from __future__ import annotations

import logging
import math
import random
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from . import distributed as dist_env
from .config import RunCfg
from .data import BadTally, DataInfo, RetrievalData, get_data
from .data.bad_samples import bad_of
from .distributed import World
from .errors import UserError
from .evaluate import evaluate_retrieval
from .freeze import compile_frozen_trunk, FreezePlan, apply_trainable, build_plan, count_trainable, format_counts, freeze_bn_stats, install_frozen_eval
from .losses import total
from .numerics import NonFiniteGuard, all_finite, is_failure
from .objective import Objective
from .models import create_model, get_preprocess, get_tokenizer
from .models.weights import fit_problems, load_torch_file
from .optim import add_groups, apply_lr, build_optimizer, check_coverage, group_layout, group_table, groups_from_layout, make_groups
from .precision import autocast, grad_scaler, input_dtype
from .progress import ProgressLine
from .run_outputs import Reporters, RunPaths, append_result, drop_results_after
from .schedule import ScheduleCfg, lr_at


@contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn the library's ValueError / missing-file errors about user input into UserError."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise UserError(f"{what}: {e}") from None


def _data_file_kind(dataset_type: str, path: str) -> Optional[str]:
    """'coco' / 'csv' when `path` must be one local file, else None (webdataset URLs, synthetic)."""
    if dataset_type in ("coco", "csv"):
        return dataset_type
    if dataset_type == "auto":
        return {"json": "coco", "csv": "csv", "tsv": "csv"}.get(path.rsplit(".", 1)[-1].lower())
    return None


def check_config(cfg: RunCfg) -> None:
    """User errors that need no data and no real weights, checked before any process group,
    run directory or data read: the files the flags name, the model name, the tokenizer and
    the whole freezing schedule (resolved on a meta-device model)."""
    d, m = cfg.data, cfg.model
    if not d.train_data and not d.val_data and d.dataset_type != "synthetic":
        raise UserError("nothing to do: give --train-data and/or --val-data")
    for flag, path in (("--train-data", d.train_data), ("--val-data", d.val_data)):
        if path and _data_file_kind(d.dataset_type, path) and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    for flag, path in (("--train-image-root", d.train_image_root), ("--val-image-root", d.val_image_root)):
        if path and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: no such directory")
    for flag, path in (("--pretrained", m.pretrained), ("--pretrained-image-path", m.pretrained_image_path),
                       ("--pretrained-text-path", m.pretrained_text_path), ("--text-tokenizer", m.text_tokenizer)):
        if path and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file or directory (weights are only read from local paths)")
    obj = cfg.objective
    if obj.distill is not None:
        for flag, path in (("--teacher-pretrained", obj.distill.teacher_pretrained),
                           ("--teacher-cache", obj.distill.teacher_cache)):
            if path and not Path(path).exists():
                raise UserError(f"{flag} {path}: no such file or directory")
        with _quiet(), user_errors(f"--teacher-model {obj.distill.teacher_model}"):
            teacher, _ = create_model(obj.distill.teacher_model, device="meta")
        if obj.distill.teacher_pretrained:
            _check_fits("--teacher-pretrained", obj.distill.teacher_pretrained, teacher, cfg.trust_checkpoint,
                        unexpected_ok=True)
    if obj.headalign is not None and not m.pretrained:
        raise UserError("--headalign needs --pretrained: the checkpoint's own image head is the reference")
    resume = cfg.output.resume
    if resume is not None and resume != "latest" and not Path(resume).is_file():
        raise UserError(f"--resume {resume}: no such checkpoint")
    with _quiet():
        with user_errors(f"--model {m.name}"):
            skeleton, _ = create_model(m.name, device="meta")
        with user_errors("--text-tokenizer" if m.text_tokenizer else f"--model {m.name}"):
            get_tokenizer(m.name, m.text_tokenizer)
        build_plan(skeleton, cfg.freeze, cfg.train.epochs)
    if resume is not None and resume != "latest":
        _check_fits("--resume", resume, skeleton, cfg.trust_checkpoint)
    if m.pretrained and not m.pretrained.endswith(".safetensors") and Path(m.pretrained).is_file():
        with user_errors("--pretrained"):  # loading is tolerant of other architectures; unpickling is not
            load_torch_file(m.pretrained, cfg.trust_checkpoint, mmap=True)


def _check_fits(flag: str, path: str, skeleton: torch.nn.Module, trust: bool, unexpected_ok: bool = False) -> None:
    """A checkpoint of another architecture (or one that needs unpickling) is refused before any
    data or weights are read: memory-mapped, only its keys and shapes are looked at."""
    if str(path).endswith(".safetensors"):
        return
    with user_errors(flag):
        state = load_torch_file(path, trust, mmap=True)
    sd = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{flag} {path}: not a checkpoint (no state_dict)")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    problems = [p for p in fit_problems(sd, skeleton.state_dict()) if not (unexpected_ok and p.startswith("unexpected"))]
    if problems:
        arch = f" (saved from model {state['model']!r})" if isinstance(state.get("model"), str) else ""
        raise UserError(f"{flag} {path}{arch} does not fit this model: {'; '.join(problems)}")


@contextmanager
def _quiet() -> Iterator[None]:
    """No log output or warnings from the pre-flight build (the real build repeats them, into
    out.log). The NullHandler also keeps `logging.info` from calling basicConfig(), which would
    leave a second, unformatted stderr handler behind."""
    root, null = logging.getLogger(), logging.NullHandler()
    root.addHandler(null)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        root.removeHandler(null)


def seed_everything(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


@dataclass
class _Meter:
    """Samples/s and loss averaged over the logging interval (not just the last step)."""
    t0: float = field(default_factory=time.perf_counter)
    samples: int = 0
    steps: int = 0
    data_time: float = 0.0
    losses: Dict[str, float] = field(default_factory=dict)
    loss_steps: int = 0  # steps whose losses are in `losses` (a skipped non-finite step's are not)

    def add(self, samples: int, terms: Dict[str, float], data_time: float) -> None:
        self.samples += samples
        self.steps += 1
        self.data_time += data_time
        self.loss_steps += bool(terms)
        for k, v in terms.items():
            self.losses[k] = self.losses.get(k, 0.0) + v

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


class Trainer:
    def __init__(self, cfg: RunCfg, world: World, device: torch.device, paths: Optional[RunPaths]):
        self.cfg, self.world, self.device, self.paths = cfg, world, device, paths
        self.step = 0
        self.start_epoch = 0
        self.ddp: Optional[torch.nn.Module] = None
        self.verify_grads = True  # cheap frozen-gets-no-grad check on the first step after a change
        self.reporters: Optional[Reporters] = None
        self.nonfinite = NonFiniteGuard(cfg.train.skip_nonfinite_steps)
        self.epoch_bad = BadTally()  # this rank's bad samples in the current epoch
        self.epoch_bad_total = 0  # all ranks' count, summed step by step
        self.where = ""  # "epoch E, batch b/n", for messages

    # ---------------------------------------------------------------- build
    @classmethod
    def build(cls, cfg: RunCfg, world: World, device: torch.device, paths: Optional[RunPaths]) -> "Trainer":
        self = cls(cfg, world, device, paths)
        seed_everything(cfg.train.seed, 0)  # identical init on every rank
        with user_errors(f"--model {cfg.model.name}"):
            self.model, report = create_model(
                cfg.model.name,
                pretrained=cfg.model.pretrained,
                pretrained_image=cfg.model.pretrained_image,
                pretrained_image_path=cfg.model.pretrained_image_path,
                pretrained_text_path=cfg.model.pretrained_text_path,
                precision=cfg.model.precision,
                device=device,
                trust_checkpoint=cfg.trust_checkpoint,
            )
            self.tokenizer = get_tokenizer(cfg.model.name, cfg.model.text_tokenizer)
        if report is not None:
            report.log(logging.getLogger())
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.plan = build_plan(self.model, cfg.freeze, cfg.train.epochs)
        for note in self.plan.notes:
            logging.info(f"freeze: {note}")
        self._apply_rules(0, log_as="INIT")
        if not cfg.freeze.frozen_train_mode:
            install_frozen_eval(self.model)

        self.objective = Objective(cfg.objective, self.model, world, device, self.tokenizer)
        preprocess_train = get_preprocess(self.model, is_train=True, no_augment=cfg.train.no_augment)
        preprocess_val = get_preprocess(self.model, is_train=False)
        with user_errors("data"):
            self.data = get_data(cfg.data, preprocess_train, preprocess_val, self.objective.tokenizer, world.rank, world.world_size)
        self.train_data: Optional[DataInfo] = self.data.get("train")
        self.val_data: Optional[RetrievalData] = self.data.get("val")
        steps_per_epoch = self.train_data.num_batches // cfg.train.accum_freq if self.train_data else 0
        self.steps_per_epoch = steps_per_epoch
        self.schedule = ScheduleCfg(
            kind=cfg.train.lr_scheduler,
            base_lr=cfg.optim.lr,
            warmup_steps=cfg.train.warmup,
            total_steps=steps_per_epoch * cfg.train.epochs,
            cooldown_steps=steps_per_epoch * (cfg.train.epochs_cooldown or 0),
            cooldown_power=cfg.train.lr_cooldown_power,
            cooldown_end_lr=cfg.train.lr_cooldown_end,
        )
        self.optimizer = build_optimizer(make_groups(self.model, self.plan.rules_at(0), cfg.optim), cfg.optim)
        self.scaler = grad_scaler(cfg.model.precision, device)
        self.applied_unlocks = set()
        self._wrap()
        if paths is not None:
            self.reporters = Reporters(list(cfg.output.report_to), paths, paths.root.name, cfg.settings, world.is_master,
                                       cfg.output.wandb_project_name, cfg.output.wandb_notes, bool(cfg.output.resume))
        for line in group_table(self.optimizer):
            logging.info(line)
        return self

    def _apply_rules(self, epoch: int, log_as: str) -> None:
        apply_trainable(self.model, list(self.plan.rules_at(epoch)))
        if self.cfg.freeze.frozen_train_mode and self.cfg.freeze.image.freeze_norm:
            freeze_bn_stats(self.model)
        logging.info(f"trainable params ({log_as}): {format_counts(count_trainable(self.model))}")

    def _wrap(self) -> None:
        """(Re)build the DDP wrapper over the current trainable set."""
        # (not while the objective captures trunk features: that hook must stay in Python)
        enable = self.cfg.model.compile_frozen and getattr(self.objective, "capture", None) is None
        if compile_frozen_trunk(self.model, enable):
            logging.info("image trunk fully frozen: running it compiled, without autograd (--compile-frozen)")
        self.ddp = None  # drop the old wrapper (and its reducer hooks) before building a new one
        if self.world.distributed:
            kwargs = {"device_ids": [self.device]} if self.device.type == "cuda" else {}
            self.ddp = DistributedDataParallel(self.model, static_graph=self.cfg.dist.ddp_static_graph, **kwargs)
        self.verify_grads = True

    @property
    def net(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # ---------------------------------------------------------------- resume / save
    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of this run's schedule: weights, the trainable set and param
        groups by name as they were in the checkpoint's last epoch (later unlocks follow on
        schedule in `enter_epoch`), optimizer and scaler state, step, RNG."""
        state = ckpt.load(path, trust=self.cfg.trust_checkpoint)
        sd = ckpt.strip_module_prefix(state.get("state_dict", state))
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"checkpoint {path} does not fit model {self.cfg.model.name}: "
                            f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
        epoch = int(state.get("epoch", 0))
        self.start_epoch = epoch
        self.step = int(state.get("step", epoch * self.steps_per_epoch))
        if self.train_data is None:  # evaluating a checkpoint: its weights are all that matter
            logging.info(f"=> loaded checkpoint '{path}' for evaluation (epoch {epoch})")
            return
        # The trainable set during the checkpoint's last epoch, then today's unlocks on schedule.
        rules = self.plan.rules_at(max(epoch - 1, 0))
        apply_trainable(self.model, list(rules))
        layout = state.get("param_groups")
        if layout is not None:
            names = {n for g in layout for n in g["param_names"]}
            if names != set(rules):
                raise UserError(f"checkpoint {path} trains a different parameter set than this run's freezing flags "
                                f"({len(names)} vs {len(set(rules))} params); resume with the original flags")
            groups = groups_from_layout(self.model, layout)
        else:  # upstream's checkpoints: groups rebuilt from the flags, state restored if it fits
            groups = make_groups(self.model, rules, self.cfg.optim)
        self.optimizer = build_optimizer(groups, self.cfg.optim)
        if "optimizer" in state:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                if layout is not None:
                    raise UserError(f"checkpoint {path}: optimizer state does not fit its param groups ({e})") from None
                logging.warning(f"optimizer state not restored ({e}); continuing with fresh optimizer state")
        check_coverage(self.model, self.optimizer)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            ckpt.restore_rng(state["rng"])
        self.applied_unlocks = {g["name"].split("/")[0] for g in self.optimizer.param_groups} - {"base"}
        self.objective.on_unlock({u.tower for u in self.plan.unlocks if u.origin in self.applied_unlocks})
        self._set_lr(self.step)
        self._wrap()
        logging.info(f"=> resumed checkpoint '{path}' (epoch {epoch}, step {self.step})")
        logging.info(f"trainable params (RESUME at epoch {epoch}): {format_counts(count_trainable(self.model))}")
        for line in group_table(self.optimizer):
            logging.info(line)

    def state_dict(self, completed_epoch: int) -> dict:
        state = {
            "epoch": completed_epoch,
            "name": self.paths.root.name if self.paths else "",
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "param_groups": group_layout(self.optimizer),
            "rng": ckpt.rng_state(),
            "model": self.cfg.model.name,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, completed_epoch: int) -> None:
        out = self.cfg.output
        if self.paths is None or not self.world.is_master:
            return
        is_last = completed_epoch == self.cfg.train.epochs  # always saved, as upstream
        periodic = is_last or (out.save_frequency > 0 and completed_epoch % out.save_frequency == 0)
        if not (periodic or out.save_most_recent):
            return
        state = self.state_dict(completed_epoch)
        if periodic:
            ckpt.atomic_save(state, self.paths.checkpoints / f"epoch_{completed_epoch}.pt")
            prev = self.paths.checkpoints / f"epoch_{completed_epoch - 1}.pt"
            if out.delete_previous_checkpoint and prev.exists():
                prev.unlink()  # only after the new one is safely on disk
        if out.save_most_recent:
            ckpt.atomic_save(state, self.paths.checkpoints / "epoch_latest.pt")

    # ---------------------------------------------------------------- loop
    def fit(self) -> None:
        """Epochs start_epoch..epochs-1; after each: evaluate, then checkpoint (upstream's order,
        so a checkpoint's epoch is always evaluated and results.jsonl keeps one row per epoch
        whenever the run stops)."""
        cfg = self.cfg
        if self.paths is not None and self.world.is_master:
            drop_results_after(self.paths.results, self.start_epoch)
        if self.val_data is not None and cfg.eval.val_at_start and self.start_epoch == 0:
            self.evaluate(0)
        if self.train_data is None:
            if self.val_data is not None and not cfg.eval.val_at_start:
                self.evaluate(self.start_epoch)
            return
        if self.start_epoch >= cfg.train.epochs:
            logging.info(f"nothing to train: the checkpoint has completed {self.start_epoch}/{cfg.train.epochs} epochs")
        for epoch in range(self.start_epoch, cfg.train.epochs):
            self.enter_epoch(epoch)
            self.train_epoch(epoch)
            completed = epoch + 1
            if self.val_data is not None and (completed % cfg.eval.val_frequency == 0 or completed == cfg.train.epochs):
                self.evaluate(completed)
            self.save(completed)

    def enter_epoch(self, epoch: int) -> None:
        """Apply the plan's unlocks for this epoch (idempotent across resumes)."""
        due = [u for u in self.plan.unlocks if u.epoch <= epoch and u.origin not in self.applied_unlocks]
        if not due:
            return
        rules = self.plan.rules_at(epoch)
        apply_trainable(self.model, list(rules))
        new_rules = {n: rules[n] for u in due for n in u.names}
        add_groups(self.optimizer, make_groups(self.model, new_rules, self.cfg.optim,
                                               ramp_start=self.step, ramp_steps=self.cfg.freeze.unfreeze_warmup_steps))
        self.applied_unlocks |= {u.origin for u in due}
        self.objective.on_unlock({u.tower for u in due})
        check_coverage(self.model, self.optimizer)
        self._wrap()
        what = ", ".join(f"{u.tower} ({len(u.names)} tensors)" for u in due)
        logging.info(f"unlock at epoch {epoch}: {what}")
        logging.info(f"trainable params (epoch {epoch}): {format_counts(count_trainable(self.model))}")
        for line in group_table(self.optimizer):
            logging.info(line)

    def train_epoch(self, epoch: int) -> None:
        cfg, data = self.cfg, self.train_data
        data.set_epoch(epoch)
        self.net.train()
        accum = cfg.train.accum_freq
        meter = _Meter()
        epoch_t0 = time.perf_counter()
        batches: List = []
        t_data = time.perf_counter()
        steps_done = 0
        self.epoch_bad, self.epoch_bad_total = BadTally(), 0
        # a refreshing status line on an interactive rank 0 only; the log lines are unchanged
        with ProgressLine(self.steps_per_epoch, epoch, cfg.train.epochs, enabled=self.world.is_master) as progress:
            for i, batch in enumerate(data.dataloader):
                if i // accum >= self.steps_per_epoch:
                    break
                batches.append(batch)
                if len(batches) < accum:
                    continue
                data_time = time.perf_counter() - t_data
                self._set_lr(self.step)
                self.where = f"epoch {epoch}, step {steps_done + 1} of {self.steps_per_epoch}"
                skipped_before = self.nonfinite.skipped
                terms = self.train_step(batches)
                batches = []
                self.step += 1
                steps_done += 1
                skipped = self.nonfinite.skipped > skipped_before  # its NaNs stay out of the logged means
                meter.add(cfg.train.batch_size * accum * self.world.world_size, {} if skipped else terms, data_time)
                last = steps_done == self.steps_per_epoch
                if steps_done % cfg.train.log_every_n_steps == 0 or last:
                    self._log_progress(epoch, steps_done, meter, epoch_t0)
                    meter = _Meter()
                progress.update(steps_done, sum(terms.values()), cfg.train.batch_size * accum * self.world.world_size)
                t_data = time.perf_counter()
        tally = self._bad_over_ranks()
        logging.info(f"data, epoch {epoch}: {tally.describe(of=steps_done * accum * cfg.train.batch_size * self.world.world_size)}"
                     + (" (each replaced by a substitute sample)" if tally.total else ""))

    def _bad_over_ranks(self) -> BadTally:
        parts = dist_env.all_gather_object(self.epoch_bad)
        return parts[0].merge(parts[1:])

    def _check_bad_data(self) -> None:
        """As we go: stop once this epoch's bad samples exceed the allowed fraction of the whole
        epoch (certain to be exceeded by its end), so a broken dataset wastes little time."""
        limit = self.cfg.data.max_bad_samples_fraction * self.train_data.num_samples
        if self.epoch_bad_total > limit:
            tally = self._bad_over_ranks()
            message = (f"bad training data: {tally.describe()} so far in {self.where.split(',')[0]}, more than "
                       f"--max-bad-samples-fraction {self.cfg.data.max_bad_samples_fraction:g} of its "
                       f"{self.train_data.num_samples} samples; fix or remove them, or raise the limit")
            logging.error(message)
            raise UserError(message)

    def _last_good_checkpoint(self) -> Optional[Path]:
        return ckpt.find_latest(self.paths.checkpoints) if self.paths is not None else None

    def _set_lr(self, step: int) -> None:
        """Every group's lr for optimizer step `step`: the schedule's base lr (constant --lr with
        --skip-scheduler) x the group's lr_scale x its unlock ramp."""
        base = self.cfg.optim.lr if self.cfg.train.skip_scheduler else lr_at(step, self.schedule)
        apply_lr(self.optimizer, step, base)

    def train_step(self, batches: List) -> Dict[str, float]:
        """One optimizer step over `accum_freq` micro-batches; returns the loss terms."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        dtype = input_dtype(cfg.model.precision)
        moved = [(im.to(self.device, dtype=dtype, non_blocking=True), tx.to(self.device, non_blocking=True))
                 for im, tx in batches]
        if len(moved) == 1:
            terms = self._forward_backward(*moved[0])
        else:
            terms = self._forward_backward_accum(moved)
        if self.verify_grads:
            self._check_grads()
            self.verify_grads = False
        grad_norm = None
        if cfg.train.grad_clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = self._clip()
        bad = [x for batch in batches for x in bad_of(batch)]
        self.epoch_bad.add(bad)
        loss_bad, grads_bad = self._agree_on_step(terms, grad_norm, len(bad))
        if is_failure(not loss_bad, not grads_bad, self.scaler is not None):
            self._skip_step(terms, "loss" if loss_bad else "gradient", unscaled=grad_norm is not None)
            return {k: float(v) for k, v in terms.items()}
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return {k: float(v) for k, v in terms.items()}

    def _agree_on_step(self, terms: Dict[str, torch.Tensor], grad_norm: Optional[torch.Tensor],
                       bad_samples: int) -> tuple:
        """(loss non-finite, gradients non-finite) on any rank, and the bad-data check, from one
        all-reduce of [loss flag, gradient flag, this step's bad samples], so every rank takes
        the same decisions. Gradients are only checked without a scaler (the scaler handles
        them), through clipping's total norm when clipping is on, else one fused norm."""
        loss_ok = all_finite(list(terms.values()))
        if self.scaler is not None:
            grads_ok = torch.tensor(True)
        elif grad_norm is not None:
            grads_ok = grad_norm.isfinite()
        else:
            grads_ok = all_finite([p.grad for g in self.optimizer.param_groups for p in g["params"]])
        flags = torch.stack([(~loss_ok).float().cpu(), (~grads_ok).float().cpu(), torch.tensor(float(bad_samples))])
        flags = dist_env.all_reduce_sum(flags.to(self.device)).cpu().tolist()
        self.epoch_bad_total += int(flags[2])
        self._check_bad_data()
        return flags[0] > 0, flags[1] > 0

    def _skip_step(self, terms: Dict[str, torch.Tensor], what: str, unscaled: bool) -> None:
        """No update; or NonFiniteStop once more than --skip-nonfinite-steps steps were skipped."""
        if self.scaler is not None:  # keep the scaler's bookkeeping whole: this step found inf
            if not unscaled:
                self.scaler.unscale_(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.failed(what, self.step, self.where, {k: float(v) for k, v in terms.items()},
                              self._last_good_checkpoint())

    def _clip(self) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip_norm, norm_type=2.0)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _forward_backward(self, images, texts) -> Dict[str, torch.Tensor]:
        with autocast(self.cfg.model.precision, self.device):
            terms = self.objective.terms(self.net, images, texts)
            loss = total(terms)
        self._backward(loss)
        return {k: v.detach() for k, v in terms.items()}

    def _forward_backward_accum(self, moved) -> Dict[str, torch.Tensor]:
        """Upstream's --accum-freq: features of all micro-batches first (no grad), then each
        micro-batch again with grad against the cached rest, so the loss sees the full batch."""
        precision = self.cfg.model.precision
        with torch.no_grad(), autocast(precision, self.device):
            cached = [self.objective.cache_micro(self.net, images, texts) for images, texts in moved]
        terms_sum: Dict[str, torch.Tensor] = {}
        for j, (images, texts) in enumerate(moved):
            sync = j == len(moved) - 1 or self.ddp is None
            ctx = self.ddp.no_sync() if not sync else nullcontext()
            with ctx:
                with autocast(precision, self.device):
                    terms = self.objective.terms_cached(self.net, images, texts, cached, j)
                    loss = total(terms)
                self._backward(loss)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0) + v.detach() / len(moved)
        return terms_sum

    def _check_grads(self) -> None:
        for n, p in self.model.named_parameters():
            if not p.requires_grad and p.grad is not None:
                raise RuntimeError(f"frozen parameter {n} received a gradient")
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            logging.warning(f"{len(missing)} trainable params got no gradient this step, e.g. {missing[:3]}")

    def _log_progress(self, epoch: int, steps_done: int, meter: _Meter, epoch_t0: float) -> None:
        total_steps = self.steps_per_epoch
        sps = meter.samples / meter.elapsed()
        per_step = (time.perf_counter() - epoch_t0) / steps_done
        remaining = (total_steps - steps_done) + total_steps * (self.cfg.train.epochs - epoch - 1)
        eta = _fmt_time(per_step * remaining)
        # Each rank's loss covers its local rows (--local-loss); the mean over ranks is the
        # global batch's loss, so the logged value does not depend on how the batch is split.
        names = list(meter.losses)
        means = dist_env.all_reduce_mean(
            torch.tensor([meter.losses[k] / meter.loss_steps for k in names], dtype=torch.float64, device=self.device))
        mean_loss = dict(zip(names, means.tolist()))
        losses = " ".join(f"{k.capitalize()}: {v:#.5g}" for k, v in mean_loss.items())
        lrs = " ".join(f"{g['name']}={g['lr']:.3e}" for g in self.optimizer.param_groups)
        n_done = steps_done * self.cfg.train.batch_size * self.cfg.train.accum_freq * self.world.world_size
        n_total = total_steps * self.cfg.train.batch_size * self.cfg.train.accum_freq * self.world.world_size
        logit_scale = float(self.model.logit_scale.detach().exp())
        logging.info(
            f"Train Epoch: {epoch} [{n_done}/{n_total} ({100 * steps_done / total_steps:.0f}%)] step {self.step} "
            f"Data (t): {meter.data_time / meter.steps:.3f} Batch (t): {meter.elapsed() / meter.steps:.3f}, "
            f"{sps:#g}/s, {sps / self.world.world_size:#g}/s/gpu LR: {lrs} Logit Scale: {logit_scale:.3f} "
            f"{losses} ETA: {eta}" + (f" Skipped non-finite: {self.nonfinite.skipped}" if self.nonfinite.skipped else "")
        )
        if self.reporters is not None and self.reporters.active:
            values = {f"train/{k}": v for k, v in mean_loss.items()}
            values.update({f"train/lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
            values.update({"train/samples_per_second": sps, "train/scale": logit_scale})
            values.update({f"train/trainable_{k}": v for k, v in count_trainable(self.model).items()})
            self.reporters.scalars(values, self.step)

    # ---------------------------------------------------------------- eval
    def evaluate(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        bad = BadTally()
        with user_errors("--val-data"):
            metrics = evaluate_retrieval(self.model, self.val_data, self.world, self.device, cfg.model.precision,
                                         cfg.data.batch_size, cfg.data.workers, cfg.eval.chunk_size, bad)
        self._report_bad_val(epoch, bad, metrics["num_images"] + metrics["num_bad_images"])
        row = {"epoch": epoch, "num_samples": metrics.pop("num_captions"), "num_images": metrics.pop("num_images"),
               "num_bad_images": metrics.pop("num_bad_images")}
        row.update(metrics)
        shown = " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items())
        logging.info(f"Eval Epoch: {epoch} {shown}")
        if self.world.is_master and self.paths is not None:
            append_result(self.paths.results, row)
            if self.reporters is not None:
                self.reporters.scalars({f"val/{k}": v for k, v in metrics.items()}, self.step)
        return row

    def _report_bad_val(self, epoch: int, bad: BadTally, num_images: int) -> None:
        """Bad evaluation images (left out of the metrics) and entries dropped at load: logged,
        and a user error past --max-bad-samples-fraction of the evaluation set."""
        parts = dist_env.all_gather_object(bad)
        tally = self.val_data.dropped.merge(parts)
        if not tally.total:
            return
        entries = num_images + self.val_data.dropped.total
        logging.warning(f"Eval Epoch: {epoch} left out {tally.describe(of=entries)}")
        limit = self.cfg.data.max_bad_samples_fraction
        if tally.total > limit * entries:
            raise UserError(f"bad evaluation data: {tally.describe(of=entries)}, more than "
                            f"--max-bad-samples-fraction {limit:g}; fix or remove them, or raise the limit")

    def close(self) -> None:
        if self.reporters is not None:
            self.reporters.close()



def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
