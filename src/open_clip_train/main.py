"""`python -m open_clip_train.main` / `torchrun -m open_clip_train.main`: parse, build, resume,
train, close. User errors end as one `error: ...` line and exit code 2."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

from . import checkpoint as ckpt
from . import distributed as dist_env
from .config import RunCfg
from .errors import UserError
from .params import parse_args
from .run_outputs import default_name, prepare_run_dir, provenance, setup_logging, write_params


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        cfg = RunCfg.from_args(args)
        if cfg.dry_run:
            return _dry_run(cfg)
        return _train(cfg, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _dry_run(cfg: RunCfg) -> int:
    from .dry_run import describe

    print("\n".join(describe(cfg)), flush=True)
    return 0


def _train(cfg: RunCfg, argv: List[str]) -> int:
    from .trainer import Trainer

    world = dist_env.world_from_env()
    device = dist_env.pick_device(world, cfg.dist.device if cfg.dist.device == "cpu" else "auto")
    backend = dist_env.init(world, device, cfg.dist.backend)
    trainer = None
    try:
        name = cfg.output.name or dist_env.broadcast_object(default_name(
            cfg.model.name, cfg.optim.lr, cfg.train.batch_size, cfg.data.workers, cfg.model.precision))
        resuming = cfg.output.resume is not None
        paths = prepare_run_dir(cfg.output.logs, name, resuming, world.is_master)
        setup_logging(paths.log if world.is_master else None,
                      logging.DEBUG if cfg.output.debug else logging.INFO, world.rank)
        logging.info(f"world: backend={backend if world.distributed else 'none'}, world_size={world.world_size}, "
                     f"rank={world.rank}, local_rank={world.local_rank}, nodes={world.num_nodes}, "
                     f"device={device}, from {world.source}")
        if world.is_master:
            settings = dict(cfg.settings, name=name, world_size=world.world_size, rank=world.rank,
                            distributed=world.distributed, device=str(device))
            write_params(paths.params, settings)
            import json

            (paths.root / "provenance.json").write_text(json.dumps(provenance(argv), indent=2))
            for k in sorted(settings):
                logging.debug(f"  {k}: {settings[k]}")
        trainer = Trainer.build(cfg, world, device, paths)
        resume_from = dist_env.broadcast_object(_resume_path(cfg, paths) if world.is_master else None)
        if resume_from is not None:
            trainer.resume(resume_from, trust=getattr(cfg, "trust_checkpoint", False))
        trainer.fit()
        dist_env.barrier()
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        dist_env.close()


def _resume_path(cfg: RunCfg, paths) -> Optional[Path]:
    resume = cfg.output.resume
    if resume is None:
        return None
    if resume == "latest":
        found = ckpt.find_latest(paths.checkpoints)
        if found is None:
            logging.info(f"no checkpoint to resume in {paths.checkpoints}; starting fresh")
        return found
    return Path(resume)


if __name__ == "__main__":
    sys.exit(main())
