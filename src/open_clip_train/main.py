"""`python -m open_clip_train.main` / `torchrun -m open_clip_train.main`: parse, check, open the
run, build, resume, train, close. User errors end as one `error: ...` line on stderr and exit
code 2, found before any data is read where possible (`preflight.check_config`). SIGTERM / SIGUSR1
end a training run at the next step with a checkpoint and exit code 75 (`preempt.EXIT_STOPPED`).

Only the flag parser is imported at module level, so `--help` and flag errors answer at once;
torch, open_clip and the trainer are imported once the flags are known to be valid.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

from .errors import RunFailure, UserError
from .params import parse_args

if TYPE_CHECKING:
    import torch

    from .config import RunCfg
    from .distributed import World
    from .run_outputs import RunPaths


def main(argv: Optional[List[str]] = None) -> int:
    """Run the trainer; returns the exit code (0 ok, 2 user error, 3 run failure such as a
    non-finite loss, 75 stopped by a signal with a checkpoint to resume; --help returns 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)  # prints its own one-line error
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        from .cli_config import config_from_args

        with _as_user_error("invalid configuration"):
            cfg = config_from_args(args)
        if cfg.dry_run:
            return _dry_run(cfg)
        return _train(cfg, argv)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except RunFailure as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return e.exit_code


@contextmanager
def _as_user_error(what: str) -> Iterator[None]:
    """ValueErrors raised while mapping or resolving flags are the user's to fix."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def _dry_run(cfg: RunCfg) -> int:
    from .dry_run import describe

    with _as_user_error(f"--model {cfg.model.name}"):
        lines = describe(cfg)
    print("\n".join(lines), flush=True)
    return 0


def _train(cfg: RunCfg, argv: List[str]) -> int:
    from . import distributed as dist_env
    from . import faults
    from .preempt import EXIT_STOPPED, StopRequest
    from .run_outputs import teardown_logging
    from .preflight import check_config
    from .trainer import Trainer

    world = dist_env.world_from_env()
    fault = faults.from_env()  # test hook; None unless OPEN_CLIP_TRAIN_FAULT is set
    check_config(cfg)  # before any process group, run directory or data
    device = dist_env.pick_device(world, cfg.dist.device if cfg.dist.device == "cpu" else "auto")
    if cfg.dist.use_bn_sync and world.distributed and device.type != "cuda":
        raise UserError("--use-bn-sync: DDP runs SyncBatchNorm on CUDA devices only; drop the flag on CPU")
    stop = StopRequest()
    faults.install(fault, world.rank)
    backend = dist_env.init(world, device, cfg.dist.backend)
    trainer = sync = None
    try:
        paths = _open_run(cfg, world, device, argv)
        sync = _start_remote_sync(cfg, world, paths)
        logging.info(f"world: backend={backend if world.distributed else 'none'}, world_size={world.world_size}, "
                     f"rank={world.rank}, local_rank={world.local_rank}, nodes={world.num_nodes}, "
                     f"device={device}, rendezvous={world.rendezvous}, from {world.source}")
        trainer = Trainer.build(cfg, world, device, paths, stop)
        resume_from = dist_env.broadcast_object(_resume_path(cfg, paths) if world.is_master else None)
        if resume_from is not None:
            trainer.resume(resume_from)
        # From here on a stop signal is recorded and acted on at the next step boundary. Before,
        # it keeps its default action: nothing of this attempt is lost, and a process blocked in
        # the rendezvous or in data loading ends at once instead of waiting for a step.
        stop.install()
        stopped = trainer.fit()
        dist_env.barrier()
        return EXIT_STOPPED if stopped else 0
    finally:
        if trainer is not None:
            trainer.close()
        if sync is not None:
            sync.close()  # last copy, after the trainer wrote its last file; a failure is logged
        dist_env.close()
        teardown_logging()
        faults.install(None, 0)
        stop.restore()


def _open_run(cfg: RunCfg, world: World, device: torch.device, argv: List[str]) -> Optional[RunPaths]:
    """Name the run, refuse to overwrite an earlier one (on every rank alike), create its
    directory, start logging and record params.txt and provenance.json."""
    from . import distributed as dist_env
    from .run_outputs import (default_name, log_file, prepare_run_dir, run_dir_problem, run_paths, setup_logging,
                              write_params, write_provenance)

    out = cfg.output
    name = out.name or dist_env.broadcast_object(default_name(
        cfg.model.name, cfg.optim.lr, cfg.train.batch_size, cfg.data.workers, cfg.model.precision))
    paths = run_paths(out.logs, name)
    problem = dist_env.broadcast_object(run_dir_problem(paths, out.resume is not None) if world.is_master else None)
    if problem:
        raise UserError(problem)
    if world.is_master:
        prepare_run_dir(paths)
    log = log_file(paths, world.rank, world.local_rank, out.log_local)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)  # another node's view of a shared or a local disk
    setup_logging(log, logging.DEBUG if out.debug else logging.INFO, world.rank)
    if world.is_master and paths is not None:
        from .checkpoint import remove_stale_temps

        for p in remove_stale_temps(paths.checkpoints):
            logging.warning(f"removed {p.name}: the temporary file of a checkpoint write that was interrupted")
    if world.is_master and paths is not None:
        settings = dict(cfg.settings, name=name, world_size=world.world_size, rank=world.rank,
                        distributed=world.distributed, device=str(device))  # resolved, as upstream
        write_params(paths.params, settings)
        write_provenance(paths.root / "provenance.json", argv)
        if out.copy_codebase:
            from .provenance_code import record_code

            code, written = record_code(paths.root)
            logging.info(f"--copy-codebase: source of this run {'recorded in' if written else 'unchanged, as in'} {code}")
        for k in sorted(settings):
            logging.debug(f"  {k}: {settings[k]}")
    return paths


def _start_remote_sync(cfg: RunCfg, world: World, paths: Optional[RunPaths]):
    """--remote-sync on rank 0: a first sync that must succeed (every rank stops alike if it does not),
    then a periodic one; None when off."""
    from . import distributed as dist_env
    from .remote_sync import RemoteSync, RemoteSyncError, remote_run_url

    rs = cfg.output.remote_sync
    if not rs.enabled or paths is None:
        return None
    sync, problem = None, None
    if world.is_master:
        sync = RemoteSync(paths.root, remote_run_url(rs.remote, paths.root.name), rs.protocol, rs.frequency)
        try:
            sync.start()
        except RemoteSyncError as e:
            problem = str(e)
    problem = dist_env.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    return sync


def _resume_path(cfg: RunCfg, paths: Optional[RunPaths]) -> Optional[Path]:
    from . import checkpoint as ckpt

    resume = cfg.output.resume
    if resume is None:
        return None
    if resume == "latest":
        found = ckpt.find_latest(paths.checkpoints) if paths is not None else None
        if found is None:
            where = paths.checkpoints if paths is not None else "--log-dir none"
            logging.info(f"--resume latest: no checkpoint to resume in {where}; starting fresh")
        return found
    return Path(resume)


if __name__ == "__main__":
    sys.exit(main())
