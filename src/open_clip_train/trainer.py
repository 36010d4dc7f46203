"""The training session: wires model, freezing plan, optimizer, data, loss and outputs.

Named steps, called by `main`: `Trainer.build` -> `resume` -> `fit` -> `close`. Inside `fit`,
every epoch starts with `enter_epoch`, which applies the freezing plan: unlocked params get
requires_grad, their own param groups (nothing else in the optimizer changes), and the DDP
wrapper is rebuilt, because DDP only hooks params that required grad when it was built.
Flipping requires_grad under a live wrapper would leave new params unsynchronised.

Every step's decisions (non-finite loss or gradients, bad samples, a stop signal on some rank) come
from one all-reduce (`numerics.step_flags`). With a fused optimizer (the default AdamW) the host
does not wait for it: a failed step's update is dropped on the device, and the flags are read
during the next step, once its work is queued, or at once at a log step, a save or the epoch's end
(`settle`). So a stop signal received during step N stops the run after step N+1 (after N when N
logs, saves or ends the epoch). Other optimizers read the flags within the step. At the step
boundary (`_step_boundary`): the --save-every-n-steps checkpoint, then, if a stop signal was
agreed, rank 0 checkpoints that exact step and `fit` returns True (stopped). Each epoch's save is
followed by its own stop agreement (a signal during the evaluation or the save).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from . import distributed as dist_env
from . import faults
from .accumulate import forward_backward_accum
from .allocator import retain_freed_memory
from .config import RunCfg
from .data import BadTally, DataInfo, RetrievalData, get_data
from .data.bad_budget import BadSampleBudget
from .distributed import World
from .errors import UserError
from .evaluate import evaluate_retrieval
from .video import attach_video
from .video import training as video_training
from .zeroshot import ZeroShotEvaluator
from .frozen_compile import FrozenTrunkCompiler
from . import frozen_features
from .freeze import apply_trainable, build_plan, count_trainable, format_counts, freeze_bn_stats, install_frozen_eval
from .losses import total
from .numerics import (NonFiniteGuard, PendingAgreement, StepAgreement, failure_flag, is_failure, poison_gradients,
                       read_flags, skip_step, step_flags, step_unless)
from .objective import Objective
from .preempt import StopRequest, signal_name
from .distill.cache import augmentation_notice
from .models import create_model, get_preprocess, get_tokenizer, loss_model_kwargs
from .model_overrides import create_model_kwargs, tokenizer_context_length, transforms
from .models.text_trim import ROUND as TEXT_TRIM_ROUND
from .models.text_trim import caller_trims, host_prefix_length, set_text_padding_trim, text_padding_trim
from .optim import add_groups, apply_lr, build_optimizer, check_coverage, group_layout, group_table, groups_from_layout, make_groups
from .precision import autocast, grad_scaler, input_dtype
from .preflight import user_errors
from .progress import IntervalMeter, ProgressLine, TrainLog
from .run_outputs import Reporters, RunPaths, append_metrics, append_result, drop_metrics_after, drop_results_after
from .schedule import ScheduleCfg, lr_at


def seed_everything(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


class Trainer:
    # Read each step's agreement a step later when the optimizer can drop an update on the device;
    # False reads it within the step (benchmarks/bench_host_sync.py measures the difference).
    defer_agreement = True

    def __init__(self, cfg: RunCfg, world: World, device: torch.device, paths: Optional[RunPaths],
                 stop: Optional[StopRequest] = None):
        self.cfg, self.world, self.device, self.paths = cfg, world, device, paths
        self.stop = stop
        self._agreed_stop = 0  # the stop signal the last step's agreement found (0: none)
        self._pending: Optional[PendingAgreement] = None  # a step's agreement not read yet
        self._step_ok: bool | torch.Tensor = True  # the last step kept its update (a device flag when deferred)
        self.step = 0
        self.start_epoch = 0
        self.start_epoch_step = 0  # optimizer steps of start_epoch already done (mid-epoch resume)
        self.ddp: Optional[torch.nn.Module] = None
        self.verify_grads = True  # cheap frozen-gets-no-grad check on the first step after a change
        self.reporters: Optional[Reporters] = None
        self.nonfinite = NonFiniteGuard(cfg.train.skip_nonfinite_steps)
        self.bad_budget = BadSampleBudget(cfg.data.max_bad_samples_fraction)
        self.where = ""  # "epoch E, batch b/n", for messages
        self.features: Optional[frozen_features.FrozenFeatures] = None  # --frozen-feature-cache
        # glibc keeps freed memory once the steps settle into their steady form (allocator.py)
        self._retain_pending = cfg.malloc_retain and device.type == "cpu"

    # ---------------------------------------------------------------- build
    @classmethod
    def build(cls, cfg: RunCfg, world: World, device: torch.device, paths: Optional[RunPaths],
              stop: Optional[StopRequest] = None) -> "Trainer":
        self = cls(cfg, world, device, paths, stop)
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
                model_kwargs=loss_model_kwargs(cfg.objective.loss.siglip),
                overrides=create_model_kwargs(cfg.model.overrides),
            )
            self.tokenizer = get_tokenizer(cfg.model.name, cfg.model.text_tokenizer,
                                           context_length=tokenizer_context_length(cfg.model.overrides))
        # --torchcompile: the trimmed length is read from the tokens (a graph break and a recompile
        # per length), so the compiled model runs the full context length
        # CoCa: the caption decoder reads the full token sequence (its labels are the tokens shifted)
        trim = cfg.model.trim_text_padding and not cfg.model.torchcompile and not hasattr(self.model, "text_decoder")
        if set_text_padding_trim(self.model, trim) and trim:
            logging.info("text tower: runs on each batch's tokens up to its last EOS, rounded up to "
                         f"{TEXT_TRIM_ROUND} (--no-trim-text-padding for the full context length)")
        if report is not None:
            report.log(logging.getLogger())
        if cfg.video is not None:  # after the weights and the text trim, before the freezing plan
            attach_video(self.model, cfg.video.model)
            logging.info(f"video: {cfg.video.model.pooling} pooling over up to {cfg.video.model.max_frames} frames")
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self._convert_bn_sync()
        self.plan = build_plan(self.model, cfg.freeze, cfg.train.epochs)
        for note in self.plan.notes:
            logging.info(f"freeze: {note}")
        self._apply_rules(0, log_as="INIT")
        if not cfg.freeze.frozen_train_mode:
            install_frozen_eval(self.model)

        if cfg.video is not None and cfg.objective.distill is not None:  # TeachCLIP (video/objective.py)
            from .video.objective import VideoDistillObjective

            self.objective = VideoDistillObjective(cfg.objective, cfg.video, cfg.data.train_data, self.model, world,
                                                   device, self.tokenizer)
        else:
            self.objective = Objective(cfg.objective, self.model, world, device, self.tokenizer)
        # the models whose text towers take the tokens trimmed on the host (text_trim.host_prefix_length)
        self.trim_readers = (self.objective.token_readers(self.model) or []) if text_padding_trim(self.model) else []
        notice = augmentation_notice(not cfg.train.no_augment) if self.objective.needs_ids else None
        if notice:
            logging.warning(notice)
        if cfg.train.frozen_feature_cache:
            why = frozen_features.blockers(cfg, self.objective)
            if why:
                raise UserError(f"--frozen-feature-cache: the frozen outputs would differ from the live ones: {why[0]}")
        if cfg.model.overrides.any:  # --aug-cfg on the training transform, as create_model_and_transforms
            preprocess_train, preprocess_val = transforms(self.model, cfg.model.overrides,
                                                          augment=not cfg.train.no_augment)
        else:
            preprocess_train = get_preprocess(self.model, is_train=True, no_augment=cfg.train.no_augment)
            preprocess_val = get_preprocess(self.model, is_train=False)
        self.preprocess = (preprocess_train, preprocess_val)
        with user_errors("data"):
            self.data = get_data(cfg.data, preprocess_train, preprocess_val, self.objective.tokenizer, world.rank,
                                 world.world_size, with_ids=self.objective.needs_ids or bool(cfg.train.frozen_feature_cache),
                                 video=cfg.video)
        self.train_data: Optional[DataInfo] = self.data.get("train")
        self.val_data: Optional[RetrievalData] = self.data.get("val")
        with user_errors("zero-shot"):
            self.zeroshot = ZeroShotEvaluator(cfg.zeroshot, preprocess_val, self.tokenizer)
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
        # (not while the objective captures trunk features: that hook must stay in Python)
        self.compiler = FrozenTrunkCompiler(cfg.model.compile_frozen, device,
                                            allowed=getattr(self.objective, "capture", None) is None
                                            and not cfg.model.torchcompile)
        if cfg.model.torchcompile:
            self._compile_model()
        self._wrap()
        if paths is not None:
            self.reporters = Reporters(list(cfg.output.report_to), paths, paths.root.name, cfg.settings, world.is_master,
                                       cfg.output.wandb_project_name, cfg.output.wandb_notes, bool(cfg.output.resume))
        for line in group_table(self.optimizer):
            logging.info(line)
        return self

    def _compile_model(self) -> None:
        """--torchcompile: the whole model compiled in place (`nn.Module.compile`: parameter names
        and checkpoints unchanged), before the DDP wrapper, which then wraps the compiled module,
        as torchtitan orders them. (Upstream compiles the unwrapped model after wrapping, so its
        compiled model runs without DDP's gradient hooks.) The trunk-only --compile-frozen is off."""
        self.model.compile()
        logging.info("torch.compile: whole model compiled (compiles at the first step); --compile-frozen off, "
                     "text padding trim off")

    def _recompile_after_unlock(self) -> None:
        """The compiled graphs were traced with the old requires_grad; dropping them makes the
        next step trace the new trainable set rather than rely on guard failures."""
        if self.cfg.model.torchcompile:
            torch.compiler.reset()
            logging.info("torch.compile: trainable set changed at the unlock; compiled graphs dropped, the model "
                         "recompiles at the next step")

    def _apply_rules(self, epoch: int, log_as: str) -> None:
        apply_trainable(self.model, list(self.plan.rules_at(epoch)))
        if self.cfg.freeze.frozen_train_mode and self.cfg.freeze.image.freeze_norm:
            freeze_bn_stats(self.model)
        logging.info(f"trainable params ({log_as}): {format_counts(count_trainable(self.model))}")

    def _retain_freed_memory(self) -> None:
        self._retain_pending = False
        note = retain_freed_memory()
        if note:
            logging.info(note)

    def _convert_bn_sync(self) -> None:
        """--use-bn-sync under DDP (upstream converts before wrapping): BatchNorm layers become
        SyncBatchNorm in place, keeping their parameter and buffer tensors and names, before the
        freezing plan and the optimizer see them, so every later DDP wrapper (each unlock rebuilds
        one) wraps the same synchronised layers. In one process there is nothing to synchronise."""
        if not self.cfg.dist.use_bn_sync:
            return
        if not self.world.distributed:
            logging.info("--use-bn-sync: one process, BatchNorm left as it is")
            return
        before = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        logging.info(f"--use-bn-sync: {before} BatchNorm layers synchronised across the {self.world.world_size} ranks")

    def _wrap(self) -> None:
        """(Re)build the DDP wrapper over the current trainable set."""
        self.compiler.on_phase(self.model, self.step, self._image_frozen_until())
        self.ddp = None  # drop the old wrapper (and its reducer hooks) before building a new one
        if self.world.distributed:
            kwargs = {"device_ids": [self.device]} if self.device.type == "cuda" else {}
            self.ddp = DistributedDataParallel(self.model, static_graph=self.cfg.dist.ddp_static_graph, **kwargs)
        self.verify_grads = True

    def _image_frozen_until(self) -> int:
        """The global step at which the image tower's next unlock (or the run) ends this phase."""
        later = [u.epoch for u in self.plan.unlocks if u.tower == "image" and u.origin not in self.applied_unlocks]
        return min(later + [self.cfg.train.epochs]) * self.steps_per_epoch

    @property
    def net(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # ---------------------------------------------------------------- resume / save
    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of this run's schedule: weights, the trainable set and param
        groups by name as they were in the checkpoint's last epoch (later unlocks follow on
        schedule in `enter_epoch`), optimizer and scaler state, step, RNG and, for a mid-epoch
        checkpoint, the position in the epoch."""
        state = ckpt.load(path, trust=self.cfg.trust_checkpoint)
        sd = ckpt.strip_module_prefix(state.get("state_dict", state))
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"checkpoint {path} does not fit model {self.cfg.model.name}: "
                            f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
        epoch = int(state.get("epoch", 0))
        epoch_step = int(state.get("epoch_step", 0))
        self.start_epoch = epoch
        self.step = int(state.get("step", epoch * self.steps_per_epoch))
        if self.train_data is None:  # evaluating a checkpoint: its weights are all that matter
            logging.info(f"=> loaded checkpoint '{path}' for evaluation (epoch {epoch})")
            return
        if epoch_step and (epoch_step > self.steps_per_epoch or self.step != epoch * self.steps_per_epoch + epoch_step):
            raise UserError(f"checkpoint {path} was saved at step {epoch_step} of epoch {epoch} with another number of "
                            f"steps per epoch than this run's {self.steps_per_epoch}; resume with the original "
                            "--batch-size, --train-num-samples, --accum-freq and world size")
        self.start_epoch_step = epoch_step
        # The trainable set when the checkpoint was written (inside epoch `epoch`, or at the end
        # of the one before), then today's unlocks on schedule.
        rules = self.plan.rules_at(epoch if epoch_step else max(epoch - 1, 0))
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
        where = f", {epoch_step}/{self.steps_per_epoch} steps into epoch {epoch}" if epoch_step else ""
        logging.info(f"=> resumed checkpoint '{path}' (epoch {epoch}, step {self.step}{where})")
        logging.info(f"trainable params (RESUME at epoch {epoch}): {format_counts(count_trainable(self.model))}")
        for line in group_table(self.optimizer):
            logging.info(line)

    def state_dict(self, completed_epoch: int, epoch_step: int = 0) -> dict:
        """`epoch`: completed epochs (upstream's meaning); `epoch_step`: optimizer steps done
        in the next one (a mid-epoch checkpoint; upstream's loader restarts that epoch)."""
        state = {
            "epoch": completed_epoch,
            "epoch_step": epoch_step,
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

    def _periodic(self, completed_epoch: int) -> bool:
        out = self.cfg.output
        is_last = completed_epoch == self.cfg.train.epochs  # always saved, as upstream
        return is_last or (out.save_frequency > 0 and completed_epoch % out.save_frequency == 0)

    def _saves_at_epoch_end(self, completed_epoch: int) -> bool:
        """Whether `save(completed_epoch)` writes a checkpoint (the same answer on every rank)."""
        return self.paths is not None and (self._periodic(completed_epoch) or self.cfg.output.save_most_recent)

    def save(self, completed_epoch: int) -> bool:
        """The epoch-end checkpoint(s); True when one was written. Every deletion comes after the
        write that supersedes it, so a kill at any point leaves a complete checkpoint."""
        out = self.cfg.output
        if not self._saves_at_epoch_end(completed_epoch):
            return False
        if not self.world.is_master:
            return True
        state = self.state_dict(completed_epoch)
        if self._periodic(completed_epoch):
            ckpt.atomic_save(state, self.paths.checkpoints / f"epoch_{completed_epoch}.pt")
            if out.delete_previous_checkpoint:
                for n, prev in ckpt.list_checkpoints(self.paths.checkpoints).items():
                    if n < completed_epoch:
                        prev.unlink()
        if out.save_most_recent:
            ckpt.atomic_save(state, self.paths.checkpoints / "epoch_latest.pt")
        self._drop_step_checkpoints(before=self.step + 1)  # superseded by this epoch's end
        return True

    def save_step(self, epoch: int, epoch_step: int) -> None:
        """A mid-epoch checkpoint, step_<global step>.pt; the older ones go once it is on disk."""
        if self.paths is None or not self.world.is_master:
            return
        path = self.paths.checkpoints / ckpt.step_name(self.step)
        ckpt.atomic_save(self.state_dict(epoch, epoch_step), path)
        self._drop_step_checkpoints(before=self.step)
        logging.info(f"saved {path.name} (epoch {epoch}, {epoch_step}/{self.steps_per_epoch} steps, step {self.step})")

    def _drop_step_checkpoints(self, before: int) -> None:
        for s, p in ckpt.list_step_checkpoints(self.paths.checkpoints).items():
            if s < before:
                p.unlink()

    # ---------------------------------------------------------------- loop
    def fit(self) -> bool:
        """Epochs start_epoch..epochs-1; after each: evaluate, then checkpoint (upstream's order,
        so a checkpoint's epoch is always evaluated and results.jsonl keeps one row per epoch
        whenever the run stops). Returns True when a stop signal ended it early (checkpointed)."""
        cfg = self.cfg
        if self.paths is not None and self.world.is_master:
            drop_results_after(self.paths.results, self.start_epoch)
            drop_metrics_after(self.paths.metrics, self.step)
        evaluates = self.val_data is not None or bool(self.zeroshot.sets)
        if evaluates and cfg.eval.val_at_start and self.start_epoch == 0:
            self.evaluate(0)
        if self.train_data is None:
            if evaluates and not cfg.eval.val_at_start:
                self.evaluate(self.start_epoch)
            return False
        if self.start_epoch < cfg.train.epochs:
            self._frozen_features()
        if self.start_epoch >= cfg.train.epochs:
            logging.info(f"nothing to train: the checkpoint has completed {self.start_epoch}/{cfg.train.epochs} epochs")
        for epoch in range(self.start_epoch, cfg.train.epochs):
            self.enter_epoch(epoch)
            if self.train_epoch(epoch):
                return True
            completed = epoch + 1
            retrieval = self.val_data is not None and (completed % cfg.eval.val_frequency == 0
                                                       or completed == cfg.train.epochs)
            zeroshot = self.zeroshot.cfg.due(completed, cfg.train.epochs) and bool(self.zeroshot.sets)
            if retrieval or zeroshot:
                self.evaluate(completed, retrieval=retrieval, zeroshot=zeroshot)
            saved = self.save(completed)
            signum = self._stop_agreed()  # a signal during the evaluation or the save lands here
            if signum and completed < cfg.train.epochs:
                self._stop(completed, 0, signum, saved)
                return True
        return False

    def _frozen_features(self) -> None:
        """--frozen-feature-cache: compute or reuse the frozen parts' outputs and train on them; without
        it, one line saying when it would apply."""
        cfg = self.cfg
        due = {u.tower for u in self.plan.unlocks if u.epoch <= self.start_epoch and u.origin not in self.applied_unlocks}
        parts = {t: p for t, p in frozen_features.frozen_parts(self.model).items() if t not in due}
        if not cfg.train.frozen_feature_cache:
            if parts and not frozen_features.blockers(cfg, self.objective):
                logging.info(frozen_features.notice(parts))
            return
        if not parts:
            raise UserError("--frozen-feature-cache: neither the image trunk nor the text tower is locked for this "
                            "phase; lock one (--lock-image, --lock-text) or drop the flag")
        dataset = self.train_data.dataloader.dataset
        self.features = frozen_features.for_run(cfg, parts)
        self.features.prepare(cfg, self.model, dataset, self.world, self.device)
        self.features.activate(self.model, dataset)
        if "image" in parts:
            self.compiler = FrozenTrunkCompiler("off", self.device)  # the cache replaces the trunk's forward
            self._wrap()

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
        if self.features is not None and self.features.on_unlock({u.tower for u in due}, self.model,
                                                                self.train_data.dataloader.dataset):
            self.train_data.dataloader = frozen_features.rebuild_loader(self.train_data.dataloader)
            self.compiler = FrozenTrunkCompiler(self.cfg.model.compile_frozen, self.device,
                                                allowed=getattr(self.objective, "capture", None) is None)
        check_coverage(self.model, self.optimizer)
        self._recompile_after_unlock()
        self._wrap()
        what = ", ".join(f"{u.tower} ({len(u.names)} tensors)" for u in due)
        logging.info(f"unlock at epoch {epoch}: {what}")
        logging.info(f"trainable params (epoch {epoch}): {format_counts(count_trainable(self.model))}")
        for line in group_table(self.optimizer):
            logging.info(line)

    def train_epoch(self, epoch: int) -> bool:
        """One epoch from its first batch, or from the resumed checkpoint's position; True when
        a stop signal ended it (after checkpointing that step)."""
        cfg, data = self.cfg, self.train_data
        accum = cfg.train.accum_freq
        start = self.start_epoch_step if epoch == self.start_epoch else 0
        data.set_epoch(epoch, start_batch=start * accum)
        self.net.train()
        meter, interval_skips = IntervalMeter(), self.nonfinite.skipped
        epoch_t0 = time.perf_counter()
        batches: List = []
        t_data = time.perf_counter()
        steps_done = start
        self.bad_budget.new_epoch()
        # a refreshing status line on an interactive rank 0 only; the log lines are unchanged
        with ProgressLine(self.steps_per_epoch, epoch, cfg.train.epochs, enabled=self.world.is_master) as progress:
            for i, batch in enumerate(data.batches(), start=start * accum):
                if i // accum >= self.steps_per_epoch:
                    break
                batches.append(batch)
                if len(batches) < accum:
                    continue
                data_time = time.perf_counter() - t_data
                self._set_lr(self.step)
                self.where = f"epoch {epoch}, step {steps_done + 1} of {self.steps_per_epoch}"
                if self._retain_pending and self.compiler.settled:
                    self._retain_freed_memory()
                terms = self.train_step(batches)
                batches = []
                self.step += 1
                self.compiler.after_step(self.model, self.step)
                steps_done += 1
                # a skipped non-finite step's losses stay out of the logged means
                meter.add(cfg.train.batch_size * accum * self.world.world_size, terms, data_time, keep=self._step_ok)
                last = steps_done == self.steps_per_epoch
                if steps_done % cfg.train.log_every_n_steps == 0 or last:
                    self.settle()  # every step of the interval decided: its skips are counted
                    self._log_progress(epoch, steps_done, steps_done - start, meter, epoch_t0,
                                       kept=meter.steps - (self.nonfinite.skipped - interval_skips))
                    meter, interval_skips = IntervalMeter(), self.nonfinite.skipped
                if progress.active:  # the loss is read only when the line is redrawn
                    progress.update(steps_done, sum(terms.values()), cfg.train.batch_size * accum * self.world.world_size)
                if self._step_boundary(epoch, steps_done):
                    return True
                t_data = time.perf_counter()
        self.settle()
        tally = self.bad_budget.over_ranks()
        logging.info(f"data, epoch {epoch}: {tally.describe(of=steps_done * accum * cfg.train.batch_size * self.world.world_size)}"
                     + (" (each replaced by a substitute sample)" if tally.total else ""))
        return False

    def _step_boundary(self, epoch: int, steps_done: int) -> bool:
        """After optimizer step `self.step` (`steps_done` of this epoch): the periodic mid-epoch
        checkpoint, the test hook, and the stop agreement. True: stopped."""
        every = self.cfg.output.save_every_n_steps
        epoch_end = steps_done == self.steps_per_epoch
        saved = bool(every) and self.step % every == 0 and not (epoch_end and self._saves_at_epoch_end(epoch + 1))
        if saved:
            self.settle()  # the checkpoint follows every decision up to this step
            self.save_step(epoch, steps_done)
        faults.at_step(self.step)
        signum, self._agreed_stop = self._agreed_stop, 0
        if signum:
            self.settle()  # this step's own flags too, before its checkpoint
            self._stop(epoch, steps_done, signum, saved)
            return True
        return False

    def _stop_agreed(self) -> int:
        """The stop signal any rank received (0: none), the same on every rank: after an epoch's
        evaluation and save (within a step, `step_flags` carries it)."""
        local = self.stop.signum if self.stop is not None else 0
        return dist_env.all_reduce_max_int(local, self.device)

    def _stop(self, epoch: int, epoch_step: int, signum: int, saved: bool) -> None:
        """Checkpoint the current position (unless the epoch's end was just saved), flush, and
        wait for rank 0's write, so no rank exits before the checkpoint is on disk."""
        name = signal_name(signum)
        logging.warning(f"{name} received: stopping after step {self.step} "
                        f"(epoch {epoch}, {epoch_step}/{self.steps_per_epoch} steps)")
        if self.paths is None:
            logging.warning("--log-dir none: no checkpoint written, the run cannot be resumed")
        elif not saved:
            self.save_step(epoch, epoch_step)
        if self.paths is not None:
            logging.info(f"stopped on {name}; continue with --resume latest")
        for h in logging.getLogger().handlers:
            h.flush()
        dist_env.barrier()

    def _last_good_checkpoint(self) -> Optional[Path]:
        return ckpt.find_latest(self.paths.checkpoints) if self.paths is not None else None

    def _set_lr(self, step: int) -> None:
        """Every group's lr for optimizer step `step`: the schedule's base lr (constant --lr with
        --skip-scheduler) x the group's lr_scale x its unlock ramp."""
        base = self.cfg.optim.lr if self.cfg.train.skip_scheduler else lr_at(step, self.schedule)
        apply_lr(self.optimizer, step, base)

    def train_step(self, batches: List) -> Dict[str, torch.Tensor]:
        """One optimizer step over `accum_freq` micro-batches; returns the loss terms as 0-dim
        tensors on the device (read at log steps only). The step's one host read is an agreement's
        flags: with a fused optimizer the previous step's, once this step is queued (see `_update`)."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        dtype = input_dtype(cfg.model.precision)
        if self.features is not None and self.features.active:
            batches = self.features.substitute(batches, dtype)
        # (images, tokens[, ids]): sample ids stay on the CPU, where a teacher cache is read
        moved = [(b[0].to(self.device, dtype=dtype, non_blocking=True), self._move_tokens(b[1]),
                  b[2] if len(b) > 2 else None) for b in batches]
        with caller_trims(self.trim_readers):
            if len(moved) == 1:
                terms = self._forward_backward(*moved[0])
            else:
                terms = self._forward_backward_accum(moved)
        if self.verify_grads:
            self._check_grads()
            self.verify_grads = False
        self.settle()  # the previous step's flags: this step's work is queued behind them
        return self._update(terms, batches)

    def _update(self, terms: Dict[str, torch.Tensor], batches: List) -> Dict[str, torch.Tensor]:
        """The step's agreement (non-finite loss or gradients, bad samples, a stop signal), then the
        optimizer's update: dropped on the device where the agreement fails when it is read later
        (`_defers`), or decided here by the host otherwise."""
        clip, scaler = self.cfg.train.grad_clip_norm is not None, self.scaler
        # Without a scaler the gradients' flag is clipping's total norm, so clip first; with one,
        # the scaler judges the gradients (unscaled only to clip: otherwise a fused optimizer
        # unscales inside its kernel, as GradScaler.step arranges).
        grad_norm = self._clip() if clip and scaler is None else None
        bad = self.bad_budget.add_batches(batches)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        faults.in_step(self.step + 1)
        terms = faults.loss_terms(self.step + 1, terms)
        flags = step_flags(terms, grad_norm, params, scaler is not None, bad, self.device,
                           self.stop.signum if self.stop is not None else 0)
        deferred = self._defers()
        if deferred:
            failed = failure_flag(flags, scaler is not None)
            self._pending = PendingAgreement.start(flags, self.step, self.where, terms)
            self._step_ok = ~failed
            if scaler is not None:
                poison_gradients(self.optimizer, failed)
        else:
            self._step_ok = not self._act(read_flags(flags.tolist()), self.step, self.where, terms)
            if not self._step_ok:
                skip_step(self.optimizer, scaler)
                return terms
        if clip and scaler is not None:
            scaler.unscale_(self.optimizer)
            self._clip()
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            scaler.update()
        elif deferred:
            step_unless(self.optimizer, failed)
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return terms

    def _defers(self) -> bool:
        """Whether this step's agreement is read later: the optimizer drops a failed update on the
        device (fused AdamW/SGD take GradScaler's `found_inf`); others need the host's decision."""
        return self.defer_agreement and getattr(self.optimizer, "_step_supports_amp_scaling", False)

    def settle(self) -> None:
        """Read and act on the pending agreement, if any (see the module doc)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._act(pending.read(), pending.step, pending.where, pending.terms)

    def _act(self, agreed: StepAgreement, step: int, where: str, terms: Dict[str, torch.Tensor]) -> bool:
        """The host's side of step `step`'s agreement: the stop signal for the step boundary, the
        bad-sample budget, and the non-finite count (raises past its budget). True: it failed."""
        self._agreed_stop = self._agreed_stop or agreed.stop_signum  # acted on at the step boundary
        self.bad_budget.check(agreed.bad_samples, self.train_data.num_samples, where.split(",")[0])
        if not is_failure(not agreed.loss_bad, not agreed.grads_bad, self.scaler is not None):
            return False
        self.nonfinite.failed("loss" if agreed.loss_bad else "gradient", step, where,
                              {k: float(v) for k, v in terms.items()}, self._last_good_checkpoint())
        return True

    def _move_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """To the device, trimmed to the text tower's prefix found on the host copy (text_trim)."""
        n = host_prefix_length(self.trim_readers, tokens) if self.trim_readers else None
        moved = tokens.to(self.device, non_blocking=True)  # whole, from pinned memory; the slice is a view
        return moved[:, :n] if n is not None else moved

    def _clip(self) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip_norm, norm_type=2.0)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _forward_backward(self, images, texts, ids) -> Dict[str, torch.Tensor]:
        with autocast(self.cfg.model.precision, self.device):
            terms = self.objective.terms(self.net, images, texts, ids)
            loss = total(terms)
        self._backward(loss)
        return {k: v.detach() for k, v in terms.items()}

    def _forward_backward_accum(self, moved) -> Dict[str, torch.Tensor]:
        """--accum-freq: the whole batch's gradients from its micro-batches (accumulate.py)."""
        return forward_backward_accum(self.objective, self.net, moved, self._backward, self.cfg.model.precision,
                                      self.device, self.ddp.no_sync if self.ddp is not None else None)

    def _check_grads(self) -> None:
        for n, p in self.model.named_parameters():
            if not p.requires_grad and p.grad is not None:
                raise RuntimeError(f"frozen parameter {n} received a gradient")
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            logging.warning(f"{len(missing)} trainable params got no gradient this step, e.g. {missing[:3]}")

    def _log_progress(self, epoch: int, steps_done: int, steps_here: int, meter: IntervalMeter,
                      epoch_t0: float, kept: int) -> None:
        """The `Train Epoch:` line in out.log, its row in metrics.jsonl, and the reporters."""
        total_steps = self.steps_per_epoch
        sps = meter.samples / meter.elapsed()
        per_step = (time.perf_counter() - epoch_t0) / max(steps_here, 1)  # steps this process ran
        remaining = (total_steps - steps_done) + total_steps * (self.cfg.train.epochs - epoch - 1)
        # Each rank's loss covers its local rows (--local-loss); the mean over ranks is the
        # global batch's loss, so the logged value does not depend on how the batch is split.
        names = list(meter.losses) if kept else []  # `kept`: the interval's steps that were not skipped
        means = dist_env.all_reduce_mean(meter.mean_losses(self.device, kept)[:len(names)])
        per_step_samples = self.cfg.train.batch_size * self.cfg.train.accum_freq * self.world.world_size
        log = TrainLog(
            epoch=epoch, step=self.step, epoch_step=steps_done, steps_per_epoch=total_steps,
            samples=steps_done * per_step_samples, samples_per_epoch=total_steps * per_step_samples,
            data_time=meter.data_time / meter.steps, batch_time=meter.elapsed() / meter.steps,
            samples_per_second=sps, world_size=self.world.world_size,
            lr={g["name"]: g["lr"] for g in self.optimizer.param_groups},
            logit_scale=float(self.model.logit_scale.detach().exp()), losses=dict(zip(names, means.tolist())),
            eta_seconds=per_step * remaining, skipped_nonfinite=self.nonfinite.skipped,
            trainable=count_trainable(self.model))
        logging.info(log.line())
        if self.world.is_master and self.paths is not None:
            append_metrics(self.paths.metrics, log.row())
        if self.reporters is not None and self.reporters.active:
            values = {f"train/{k}": v for k, v in log.losses.items()}
            values.update({f"train/lr/{k}": v for k, v in log.lr.items()})
            values.update({"train/samples_per_second": sps, "train/scale": log.logit_scale})
            values.update({f"train/trainable_{k}": v for k, v in log.trainable.items()})
            self.reporters.scalars(values, self.step)

    # ---------------------------------------------------------------- eval
    def evaluate(self, epoch: int, retrieval: bool = True, zeroshot: bool = True) -> Dict[str, float]:
        """One results.jsonl row: retrieval on --val-data (COCO-style or MSR-VTT) and zero-shot
        classification (upstream's keys), whichever is asked for and configured. An explicit
        call runs zero-shot whatever --zeroshot-frequency says (evaluating a checkpoint,
        --val-at-start)."""
        cfg = self.cfg
        row: Dict[str, float] = {"epoch": epoch}
        metrics: Dict[str, float] = {}
        if retrieval and self.val_data is not None and cfg.video is not None:
            metrics = self._video_metrics(epoch)
            row["num_samples"] = metrics["msrvtt_num_captions"]
        elif retrieval and self.val_data is not None:
            bad = BadTally()
            with user_errors("--val-data"), self._live():
                metrics = evaluate_retrieval(self.model, self.val_data, self.world, self.device, cfg.model.precision,
                                             cfg.data.batch_size, cfg.data.workers, cfg.eval.chunk_size, bad)
            self.bad_budget.check_eval(epoch, self.val_data.dropped, bad,
                                       metrics["num_images"] + metrics["num_bad_images"])
            row.update({"num_samples": metrics.pop("num_captions"), "num_images": metrics.pop("num_images"),
                        "num_bad_images": metrics.pop("num_bad_images")})
        if zeroshot and self.zeroshot.sets:
            # epochs=epoch: due by upstream's last-epoch rule, so the caller decides when
            with user_errors("zero-shot"), self._live():
                metrics.update(self.zeroshot(self.model, epoch, epoch, self.device, cfg.model.precision, self.world))
        row.update(metrics)
        shown = " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items())
        logging.info(f"Eval Epoch: {epoch} {shown}")
        if self.world.is_master and self.paths is not None:
            append_result(self.paths.results, row)
            if self.reporters is not None:
                self.reporters.scalars({f"val/{k}": v for k, v in metrics.items()}, self.step)
        return row

    def _video_metrics(self, epoch: int) -> Dict[str, float]:
        """MSR-VTT retrieval: the msrvtt_* keys (video/metrics.py), bad videos left out."""
        cfg, bad = self.cfg, BadTally()
        with user_errors("--val-data"), self._live():
            metrics = video_training.evaluate(self.model, self.val_data, self.world, self.device, cfg.model.precision,
                                              cfg.data.batch_size, cfg.data.workers, cfg.eval.chunk_size, bad)
        self.bad_budget.check_eval(epoch, self.val_data.dropped, bad, video_training.evaluated_entries(metrics))
        return metrics

    def _live(self):
        return self.features.live(self.model) if self.features is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self.reporters is not None:
            self.reporters.close()
