"""Upstream flags wired into the trainer: --remote-sync (a file:// target through main), --log-local."""
import logging

import torch
from pathlib import Path

import pytest

from open_clip_train import remote_sync
from open_clip_train.main import main

BASE = ["--model", "tiny-convnext-cliptext", "--dataset-type", "synthetic", "--train-num-samples", "2",
        "--batch-size", "2", "--precision", "fp32", "--workers", "0", "--epochs", "1", "--warmup", "1"]


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_remote_sync_holds_the_finished_run(tmp_path):
    from open_clip_train.demo_data import generate

    demo = generate(tmp_path / "demo", num_train=2, num_val=2, image_size=32)
    remote = tmp_path / "bucket"
    coco = [a.replace("synthetic", "coco") for a in BASE]
    rc = main(coco + ["--train-data", str(demo.train_annotations), "--val-data", str(demo.val_annotations), "--log-dir", str(tmp_path / "logs"), "--name", "rs", "--remote-sync", f"file://{remote}",
                      "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "3600"])
    assert rc == 0
    local, copy = _files(tmp_path / "logs" / "rs"), _files(remote / "rs")
    for name in ("out.log", "params.txt", "checkpoints/results.jsonl", "checkpoints/epoch_1.pt"):
        assert name in copy, name
    # the final sync ran after the last write: the copy is the run directory, byte for byte, except the
    # log lines written after it (the sync's own report)
    assert {k: v for k, v in copy.items() if k != "out.log"} == {k: v for k, v in local.items() if k != "out.log"}
    assert local["out.log"].startswith(copy["out.log"])


@pytest.mark.slow
def test_remote_failing_midway_is_logged_and_the_local_run_completes(tmp_path, monkeypatch):
    calls = []
    real = remote_sync.RemoteSync._sync_fsspec

    def first_only(self):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("remote went away")
        return real(self)

    monkeypatch.setattr(remote_sync.RemoteSync, "_sync_fsspec", first_only)
    rc = main(BASE + ["--log-dir", str(tmp_path / "logs"), "--name", "rf", "--remote-sync",
                      f"file://{tmp_path / 'bucket'}", "--remote-sync-protocol", "fsspec"])
    assert rc == 0 and len(calls) == 2  # the first sync, then the final one that failed
    local = tmp_path / "logs" / "rf"
    assert (local / "checkpoints" / "epoch_1.pt").is_file()
    log = (local / "out.log").read_text()
    assert "remote sync to" in log and "remote went away" in log
    assert not (tmp_path / "bucket" / "rf" / "checkpoints" / "epoch_1.pt").exists()


def test_remote_sync_first_failure_and_bad_settings_are_one_line(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the remote directory should go
    assert main(BASE + ["--log-dir", str(tmp_path / "logs"), "--name", "x", "--remote-sync", f"file://{blocker}",
                        "--remote-sync-protocol", "fsspec"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --remote-sync file://") and "first sync failed" in err[-1]
    assert main(BASE + ["--log-dir", "none", "--remote-sync", f"file://{tmp_path}", "--remote-sync-protocol",
                        "fsspec"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --remote-sync copies the run directory; --log-dir none has none"]
    assert main(BASE + ["--log-dir", str(tmp_path / "l2"), "--remote-sync", f"file://{tmp_path}",
                        "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "0"]) == 2
    assert "--remote-sync-frequency 0" in capfd.readouterr().err
    assert not (tmp_path / "l2").exists()  # refused before the run directory


def _open(tmp_path, log_local: bool, rank: int, local_rank: int):
    from open_clip_train.cli_config import config_from_args
    from open_clip_train.distributed import World
    from open_clip_train.main import _open_run
    from open_clip_train.params import parse_args
    from open_clip_train.run_outputs import teardown_logging

    args = BASE + ["--log-dir", str(tmp_path), "--name", "ll"] + (["--log-local"] if log_local else [])
    cfg = config_from_args(parse_args(args))
    world = World(rank=rank, local_rank=local_rank, world_size=4, num_nodes=2)
    try:
        _open_run(cfg, world, "cpu", args)
        logging.info(f"hello from rank {rank}")
    finally:
        teardown_logging()
    return sorted(p.name for p in (tmp_path / "ll").glob("out*")) if (tmp_path / "ll").exists() else []


def test_log_local_writes_one_file_per_node_master(tmp_path):
    # rank 2 is local rank 0 of the second node: with --log-local it keeps its own out-2, as upstream
    assert _open(tmp_path / "a", True, rank=2, local_rank=0) == ["out-2"]
    assert "hello from rank 2" in (tmp_path / "a" / "ll" / "out-2").read_text()
    assert _open(tmp_path / "b", True, rank=3, local_rank=1) == []  # not a node master: stderr only
    assert _open(tmp_path / "c", False, rank=2, local_rank=0) == []  # without the flag: rank 0 only
    assert _open(tmp_path / "d", True, rank=0, local_rank=0) == ["out.log"]


def test_one_all_reduce_per_training_step(tmp_path, monkeypatch):
    """The step's decisions (non-finite flags, bad samples, stop signals) share one all-reduce."""
    from open_clip_train import distributed, faults

    calls = []
    for name in ("all_reduce_sum", "all_reduce_mean", "all_reduce_max_int"):
        real = getattr(distributed, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(distributed, name, counted)
    at_step = faults.at_step
    monkeypatch.setattr(faults, "at_step", lambda step: (calls.append("|"), at_step(step)))
    args = [a if a != "2" else "8" for a in BASE[:6]] + ["--batch-size", "2"] + BASE[8:]  # 8 samples: 4 steps
    assert main(args + ["--log-dir", "none", "--log-every-n-steps", "1000"]) == 0
    steps = " ".join(calls).split("|")[:-1]
    # steps 1-3: the agreement only; step 4 also averages the logged losses (its log line)
    assert [s.split() for s in steps] == [["all_reduce_sum"]] * 3 + [["all_reduce_sum", "all_reduce_mean"]]


def test_caption_loss_equals_open_clips_coca_loss():
    from open_clip.loss import CoCaLoss

    from open_clip_train.losses import ContrastiveLoss, LossCfg
    from open_clip_train.objective import CaptionLoss

    g = torch.Generator().manual_seed(0)
    out = {"image_features": torch.randn(3, 8, generator=g, dtype=torch.float64),
           "text_features": torch.randn(3, 8, generator=g, dtype=torch.float64),
           "logit_scale": torch.tensor(5.0, dtype=torch.float64),
           "logits": torch.randn(3, 6, 11, generator=g, dtype=torch.float64),
           "labels": torch.tensor([[4, 5, 6, 0, 0, 0], [1, 2, 3, 7, 0, 0], [9, 9, 9, 9, 9, 2]])}
    ours = CaptionLoss(ContrastiveLoss(LossCfg()), caption_weight=1.5, contrastive_weight=0.5, pad_id=0)(out)
    ref = CoCaLoss(caption_loss_weight=1.5, clip_loss_weight=0.5, pad_id=0)(**out, output_dict=True)
    assert ours.keys() == ref.keys() == {"contrastive_loss", "caption_loss"}
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k


def test_coca_decoder_is_a_part_of_its_own_trainable_under_lock_text():
    from open_clip_train.freeze import FreezeCfg, TowerSchedule, build_plan, tower_layout
    from open_clip_train.models import create_model

    model, _ = create_model("coca_ViT-B-32", device="meta")
    layout = tower_layout(model)["decoder"]
    assert len(layout.groups) == 13  # 12 layers (self- and cross-attention), then the output
    assert layout.groups[0][0].startswith("text_decoder.resblocks.0.")
    assert any(n.startswith("text_decoder.cross_attn.0.") for n in layout.groups[0])
    assert sorted(layout.groups[-1]) == ["text_decoder.ln_final.bias", "text_decoder.ln_final.weight",
                                         "text_decoder.text_projection"]
    plan = build_plan(model, FreezeCfg(text=TowerSchedule(lock=True)), epochs=1)
    trainable = set(plan.base)
    decoder = {n for n, _ in model.named_parameters() if n.startswith("text_decoder.")}
    assert decoder <= trainable
    assert not any(n.startswith("text.") for n in trainable)
    plan = build_plan(model, FreezeCfg(lock_patterns=(r"text_decoder\.resblocks\.0\.",)), epochs=1)
    assert not any(n.startswith("text_decoder.resblocks.0.") for n in plan.base)


TINY_BN = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "resnet10t", "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _bn_trainer(tmp_path, monkeypatch, extra):
    """A model with BatchNorm in a trainer told it runs 2 ranks, its DDP wrapper replaced by a recorder of
    the BatchNorm kinds it is handed (DDP accepts SyncBatchNorm on CUDA modules only)."""
    import json

    from open_clip import factory

    from open_clip_train import trainer as trainer_module
    from open_clip_train.cli_config import config_from_args
    from open_clip_train.distributed import World
    from open_clip_train.params import parse_args
    from open_clip_train.trainer import Trainer

    path = tmp_path / "tiny-resnet-bn.json"
    path.write_text(json.dumps(TINY_BN))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS) + [path])
    factory._rescan_model_configs()
    wrapped = []
    monkeypatch.setattr(trainer_module, "DistributedDataParallel",
                        lambda module, **kw: wrapped.append((module, _bn_kinds(module))) or module)
    args = ["--model", "tiny-resnet-bn", "--dataset-type", "synthetic", "--train-num-samples", "4", "--batch-size",
            "2", "--precision", "fp32", "--workers", "0", "--epochs", "2", "--warmup", "1", "--log-dir", "none",
            "--lock-image", "--unfreeze-image-at-epoch", "1"] + extra
    trainer = Trainer.build(config_from_args(parse_args(args)), World(world_size=2), torch.device("cpu"), None)
    return trainer, wrapped


def _bn_kinds(module):
    from torch.nn.modules.batchnorm import _BatchNorm

    return {type(m).__name__ for m in module.modules() if isinstance(m, _BatchNorm)}


def test_use_bn_sync_hands_syncbatchnorm_to_ddp_before_and_after_an_unlock(tmp_path, monkeypatch):
    trainer, wrapped = _bn_trainer(tmp_path, monkeypatch, ["--use-bn-sync"])
    assert [(m is trainer.model, kinds) for m, kinds in wrapped] == [(True, {"SyncBatchNorm"})]
    trainer.enter_epoch(1)  # the unlock rebuilds the wrapper over the same, synchronised layers
    assert [(m is trainer.model, kinds) for m, kinds in wrapped] == [(True, {"SyncBatchNorm"})] * 2
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in trainer.model.parameters()} == in_optimizer  # the unlocked BN weights train too


def test_without_use_bn_sync_batchnorm_stays(tmp_path, monkeypatch):
    trainer, wrapped = _bn_trainer(tmp_path, monkeypatch, [])
    assert [kinds for _, kinds in wrapped] == [{"BatchNorm2d"}]


def test_use_bn_sync_on_cpu_ranks_is_one_line(tmp_path, monkeypatch, capfd):
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    assert main(BASE + ["--use-bn-sync", "--device", "cpu", "--log-dir", str(tmp_path)]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --use-bn-sync: DDP runs SyncBatchNorm on CUDA devices only; drop the flag on CPU"]


def _shard(path: Path, caption: str, n: int) -> str:
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_upsampling_factors_draw_sources_in_proportion(tmp_path):
    from open_clip_train.data.wds import build_train

    a = _shard(tmp_path / "a.tar", "alpha", 1)
    b = _shard(tmp_path / "b.tar", "beta", 1)
    tok = lambda texts: torch.tensor([[1 if t == "alpha" else 2] for t in texts])  # noqa: E731
    tf = lambda img: torch.zeros(1)  # noqa: E731

    def counts(factors):
        train = build_train(f"{a}::{b}", tf, tok, batch_size=1, workers=0, seed=0, rank=0, world_size=1,
                            num_samples=2000, resampled=True, pin_memory=False, upsampling_factors=factors)
        drawn = [int(tokens[0, 0]) for _, tokens in train.loader]  # a Batch is the tuple (images, tokens)
        return drawn.count(1), drawn.count(2)

    alpha, beta = counts("1::3")
    assert alpha + beta == 2000
    assert abs(beta / 2000 - 0.75) < 0.04, (alpha, beta)  # binomial sd ~0.01
    alpha, beta = counts("1::0")
    assert (alpha, beta) == (2000, 0)


def test_upsampling_factors_need_resampling_and_one_per_source(tmp_path, capfd):
    spec = f"{tmp_path}/a.tar::{tmp_path}/b.tar"
    args = BASE[2:] + ["--dataset-type", "webdataset", "--train-data", spec, "--log-dir", str(tmp_path)]
    assert main(args + ["--train-data-upsampling-factors", "1::2"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --train-data-upsampling-factors weights draws with replacement: add --dataset-resampled (as upstream)"]
    assert main(args + ["--dataset-resampled", "--train-data-upsampling-factors", "1::2::3"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 upsampling factors (1::2::3) for 2 '::' data sources" in err[0]
