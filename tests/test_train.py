"""The training worker without Ray: its config, materialisation, resume, and its errors."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from lipnext import LipNeXt, checkpoint, preset
from lipnext.augment import AUGMENTATIONS, Augmentation
from lipnext.certify import Certificate
from lipnext.checkpoint import CheckpointError, latest, load_model, verify
from lipnext.loader import ShardLoader
from lipnext.metrics import ACCURACIES, AUDIT_FLIPS, AUDIT_POINTS, CLEAN_ACC, EPOCH, LIPSCHITZ_BOUND, ORTHO_ERROR, STEP, TRAIN_LOSS, cra
from lipnext.parallelize import apply_fsdp, materialize
from lipnext.ranks import run_ranks
from lipnext.train import (
    Diverged,
    LocalSession,
    NonFiniteStep,
    Unsound,
    build_model,
    build_optimizer,
    evaluate,
    train,
    train_step,
)
from lipnext.train_config import CheckpointConfig, DataConfig, LossConfig, OptimConfig, TrainConfig

CONFIG = preset("tiny", width=40, shift_ratio=1 / 8)  # 40 rows: uneven shards on 3 ranks


def test_materialize_gives_the_weights_of_an_unsharded_init():
    expected = LipNeXt(CONFIG)
    expected.init_weights(seed=7)
    with torch.device("meta"):
        model = LipNeXt(CONFIG)
    materialize(model, torch.device("cpu"), seed=7)
    for (name, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(expected.normalize.mean, model.normalize.mean)  # buffers too


def _sharded_init():
    with torch.device("meta"):
        model = LipNeXt(CONFIG)
    apply_fsdp(model, init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    materialize(model, torch.device("cpu"), seed=7)
    local_rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    # Compared in the same process: LAPACK's QR rounds differently with another thread count.
    unsharded = LipNeXt(CONFIG)
    unsharded.init_weights(seed=7)
    return {k: v.full_tensor() for k, v in model.state_dict().items()}, unsharded.state_dict(), local_rows


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_materialize_matches_an_unsharded_init(world):
    for full, expected, local_rows in run_ranks(_sharded_init, world):
        for name, tensor in expected.items():
            assert torch.equal(full[name], tensor), name
        assert local_rows["blocks.0.basis.weight"] < CONFIG.width  # really sharded


def _config(data, checkpoint_dir, epochs=3):
    """Three epochs of tiny, at the training radius 36/255 at most (the default's 3x
    ramp reaches 108/255 in epoch 2 of 3 and costs 9 points of clean accuracy here)."""
    return TrainConfig(
        model=preset("tiny"),
        loss=LossConfig(eps_peak=1.0),
        data=DataConfig(uri=data, batch_size=100),
        checkpoint=CheckpointConfig(dir=str(checkpoint_dir), keep=5),
        epochs=epochs,
    )


EVAL = [CLEAN_ACC, cra(36), cra(72), TRAIN_LOSS, LIPSCHITZ_BOUND]


@pytest.fixture(scope="module")
def resumed(digits_shards, tmp_path_factory):
    """A 3-epoch run (checkpoints in a/), and the same run resumed after it died in
    epoch 2, when only its first checkpoint had survived (copied to b/)."""
    root = tmp_path_factory.mktemp("runs")
    session = LocalSession(_config(digits_shards, root / "a").checkpoint)
    uninterrupted = train(_config(digits_shards, root / "a"), session)
    assert len(session.history) == 3 and uninterrupted[CLEAN_ACC] > 0.5
    first = sorted((root / "a").iterdir())[0]
    shutil.copytree(first, root / "b" / first.name)
    resumed_session = LocalSession(_config(digits_shards, root / "b").checkpoint)
    return uninterrupted, train(_config(digits_shards, root / "b"), resumed_session), resumed_session, root


def test_a_run_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_one(resumed):
    uninterrupted, last, session, _ = resumed
    assert [m[EPOCH] for m in session.history] == [2, 3]
    assert {k: last[k] for k in EVAL} == {k: uninterrupted[k] for k in EVAL}


def test_every_checkpoint_holds_its_config_and_the_final_one_the_weights_alone(resumed, digits_shards):
    root = resumed[-1]
    checkpoints = sorted((root / "a").iterdir())
    for directory in checkpoints:
        written = json.loads((directory / checkpoint.CONFIG).read_text())
        assert TrainConfig.from_dict(written) == _config(digits_shards, root / "a")
    assert [(d / checkpoint.MODEL).exists() for d in checkpoints] == [False, False, True]
    final = checkpoints[-1]
    export = sum((final / name).stat().st_size for name in checkpoint.EXPORT)
    total = sum(p.stat().st_size for p in final.iterdir())
    assert export < 0.3 * total  # the optimizer's moments, slow weights and step sums stay behind
    # The export is checksummed with the rest: a flipped byte in model.pt fails verification.
    data = bytearray((final / checkpoint.MODEL).read_bytes())
    data[len(data) // 2] ^= 0xFF
    shutil.copytree(final, root / "corrupt")
    (root / "corrupt" / checkpoint.MODEL).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.pt: corrupt"):
        verify(root / "corrupt")


def test_the_final_checkpoint_rebuilds_the_trained_model_from_nothing_else(resumed, digits_shards):
    """load_model(directory) alone: its certified evaluation is the run's last, to the
    bit, and the model from the DCP shards (no export) gives the same logits."""
    _, last, _, root = resumed
    final = latest(root / "b")
    model = load_model(final)
    test = ShardLoader(digits_shards, "test", 100, shuffle=False)
    evaluated = evaluate(model, test, torch.device("cpu"))
    same = [*ACCURACIES, LIPSCHITZ_BOUND, ORTHO_ERROR]
    assert {k: evaluated[k] for k in same} == {k: last[k] for k in same}
    shutil.copytree(final, root / "shards", ignore=shutil.ignore_patterns(checkpoint.MODEL))
    images, _ = next(iter(test))
    with torch.no_grad():
        assert torch.equal(load_model(root / "shards")(images), model(images))


def _restore_after_one_rank_found_its_newest_shard_corrupt(data: str, root: str) -> dict:
    """On each of 2 ranks: a 2-epoch run checkpointing every epoch; then rank 1 flips a
    byte of a shard it wrote into the newest checkpoint; then every rank looks for the
    latest checkpoint (recording what it hashes) and the run goes on to epoch 3."""
    rank = torch.distributed.get_rank()
    train(_config(data, root, epochs=2), LocalSession(_config(data, root).checkpoint))
    torch.distributed.barrier()  # every rank's checksums written
    older, newest = sorted(Path(root).iterdir())
    listings = [json.loads((newest / checkpoint.CHECKSUMS.format(rank=r)).read_text())["files"] for r in (0, 1)]
    if rank == 1:
        shard = newest / next(name for name in listings[1] if name.endswith(".distcp"))
        data_bytes = bytearray(shard.read_bytes())
        data_bytes[len(data_bytes) // 2] ^= 0xFF
        shard.write_bytes(bytes(data_bytes))
    torch.distributed.barrier()
    hashed, digest = [], checkpoint._size_and_digest
    checkpoint._size_and_digest = lambda path: hashed.append(path) or digest(path)
    try:
        chosen = latest(root)
    finally:
        checkpoint._size_and_digest = digest
    session = LocalSession(_config(data, root).checkpoint)
    train(_config(data, root, epochs=3), session)
    return {
        "chosen": chosen.name, "older": older.name, "listings": listings,
        "hashed": {(p.parent.name, p.name) for p in hashed}, "epochs": [m[EPOCH] for m in session.history],
        "written": sorted(p.name for p in newest.glob("*.distcp")),
    }  # fmt: skip


def test_a_corrupt_newest_shard_on_one_rank_makes_every_rank_resume_from_the_same_older_checkpoint(
    digits_shards, tmp_path
):
    """Each rank hashes only the files it wrote (as DCP's writer reported them), and the ranks
    agree: rank 0's share of the newest checkpoint verifies, rank 1's does not, and both
    resume from the checkpoint before it."""
    per_rank = run_ranks(_restore_after_one_rank_found_its_newest_shard_corrupt, 2, digits_shards, str(tmp_path))
    for rank, found in enumerate(per_rank):
        assert found["chosen"] == found["older"] and found["epochs"] == [2, 3]
        newest = {name for d, name in found["hashed"] if d != found["older"]}
        assert newest and newest <= set(found["listings"][rank])  # its own files only
        assert not newest & set(found["listings"][1 - rank])
    listings = per_rank[0]["listings"]
    shards = sorted(name for listing in listings for name in listing if name.endswith(".distcp"))
    assert shards == per_rank[0]["written"]  # the listings name every shard DCP wrote, each once
    assert checkpoint.METADATA in listings[0] and checkpoint.CONFIG in listings[0]


def _tiny_step_setup(mesh=None):
    config = TrainConfig(model=CONFIG)
    model = build_model(config.model, torch.device("cpu"), seed=0, mesh=mesh)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return config, model, build_optimizer(model, config.optim), x, y


def test_a_non_finite_gradient_stops_the_step_before_the_optimizer_moves():
    config, model, optimizer, x, y = _tiny_step_setup()
    loss = train_step(model, optimizer, x, y, 36 / 255, config)
    assert loss.shape == () and not loss.requires_grad and torch.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteStep, match="the gradient norm is nan") as raised:
        train_step(model, optimizer, x, y, 36 / 255, config)
    assert torch.isnan(raised.value.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert {int(s["step"]) for s in optimizer.state.values()} == {1}  # one step taken, not two


def _step_that_stopped(nan_rank: int, nan_step: int) -> int | None:
    """FSDP2 steps on each rank; rank `nan_rank` feeds a NaN at step `nan_step`."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config, model, optimizer, x, y = _tiny_step_setup(mesh=init_device_mesh("cpu", (world,)))
    for step in range(4):
        images = x.clone()
        if (rank, step) == (nan_rank, nan_step):
            images[0, 0, 0, 0] = float("nan")
        try:
            train_step(model, optimizer, images, y, 36 / 255, config)
        except NonFiniteStep:
            return step
    return None


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step():
    """Under FSDP2 a rank that stopped alone would leave the others waiting in a collective."""
    assert run_ranks(_step_that_stopped, 2, 1, 2) == [2, 2]


def test_a_diverging_run_stops_at_the_step_whose_loss_is_not_finite(digits_shards):
    """lr 1e9 behind a one-epoch warm-up (15 steps): the first step, at 1/15 of it, makes
    the second step's loss NaN (its lr 2/15, 1.33e8), and the run stops there, in epoch 1."""
    config = TrainConfig(
        model=preset("tiny"), optim=OptimConfig(lr=1e9), data=DataConfig(uri=digits_shards, batch_size=100), epochs=2
    )
    session = LocalSession(config.checkpoint)
    with pytest.raises(Diverged) as raised:
        train(config, session)
    assert str(raised.value) == "train/loss is nan in epoch 1 (step 2, lr 1.33e+08): the trial diverged"
    assert raised.value.report.keys() == {EPOCH, STEP, TRAIN_LOSS} and math.isnan(raised.value.report[TRAIN_LOSS])
    assert session.history == []  # no report of the diverged epoch's NaN weights


def test_every_evaluation_audits_its_certificate_and_an_unsound_one_stops_the_run(digits_shards, tmp_path, monkeypatch):
    """The audit's metrics come with each evaluation's CRA; with radii three times what
    the certificate proves, the first evaluation's audit flips points inside them, the
    run stops there with the points saved, and no report of that epoch is made."""
    config = TrainConfig(
        model=preset("tiny"), data=DataConfig(uri=digits_shards, batch_size=100), epochs=2,
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt")),
    )  # fmt: skip
    session = LocalSession(config.checkpoint)
    train(config, session)
    audited = [r for r in session.history if CLEAN_ACC in r]
    assert len(audited) == 2 and all(r[AUDIT_FLIPS] == 0 and r[AUDIT_POINTS] > 0 for r in audited)

    radius = Certificate.radius
    monkeypatch.setattr(Certificate, "radius", lambda self, logits, labels: 3 * radius(self, logits, labels))
    config = dataclasses.replace(config, checkpoint=CheckpointConfig(dir=str(tmp_path / "inflated")))
    session = LocalSession(config.checkpoint)
    with pytest.raises(Unsound, match=r"flipped inside their certified radius .* saved to .*unsound\.pt \(epoch 1\)"):
        train(config, session)
    assert (tmp_path / "inflated" / "unsound.pt").exists() and session.history == []


def test_bf16_increments_certify_as_fp32_ones_on_exactly_orthogonal_weights(digits_shards):
    """The default manifold arithmetic (bf16 increments, fp32 accumulation, a projection
    at every epoch end) against every matmul in fp32, 20 epochs of digits: CRA at 36/255
    within 1 point (measured: both 0.744, losses 0.31352 and 0.31353), and every
    evaluation's weights at the float32 floor (<= 1e-6; measured ~1.3e-7)."""
    reports = {}
    for dtype in ("bfloat16", "float32"):
        config = TrainConfig(
            model=preset("tiny"), optim=OptimConfig(increment_dtype=dtype), epochs=20, eval_every_epochs=5, audit_points=0,
            data=DataConfig(uri=digits_shards, batch_size=100),
        )  # fmt: skip
        session = LocalSession(config.checkpoint)
        train(config, session)
        reports[dtype] = session.history
    evaluations = [r for history in reports.values() for r in history if ORTHO_ERROR in r]
    assert len(evaluations) == 8 and all(r[ORTHO_ERROR] <= 1e-6 for r in evaluations)
    bf16, fp32 = (reports[d][-1] for d in ("bfloat16", "float32"))
    assert fp32[cra(36)] > 0.7 and abs(bf16[cra(36)] - fp32[cra(36)]) <= 0.01
    assert bf16[TRAIN_LOSS] != fp32[TRAIN_LOSS]  # two arithmetics, not one run twice


def test_data_that_does_not_fit_the_model_is_refused_naming_the_field(digits_shards, tmp_path):
    bad = TrainConfig(model=preset("cifar-l8w256"), data=DataConfig(uri=digits_shards))
    with pytest.raises(ValueError, match=r"data\.uri: .* holds \(1, 8, 8\) images of 10 classes; the model takes \(3, 32, 32\)"):
        train(bad, LocalSession(bad.checkpoint))


BAD_CONFIGS = [  # (section, a bad value, the error), every bound of the trial's config
    (TrainConfig, dict(epochs=0), "epochs must be positive, got 0"),
    (TrainConfig, dict(eval_every_epochs=0), "eval_every_epochs must be a positive integer, got 0"),
    (TrainConfig, dict(precision="fp16"), "precision must be one of ('fp32', 'bf16'), got 'fp16'"),
    (TrainConfig, dict(device="tpu"), "device must be one of ('auto', 'cpu', 'cuda'), got 'tpu'"),
    (OptimConfig, dict(lr=0.0), "lr must be positive, got 0.0"),
    (OptimConfig, dict(betas=(0.9, 1.0)), "betas must be two values in [0, 1), got (0.9, 1.0)"),
    (OptimConfig, dict(weight_decay=-0.1), "weight_decay must not be negative, got -0.1"),
    (OptimConfig, dict(moments="sgd"), "moments must be one of ('adam', 'nadam'), got 'sgd'"),
    (OptimConfig, dict(momentum_decay=1.0), "momentum_decay must lie in [0, 1), got 1.0"),
    (OptimConfig, dict(warmup_epochs=-1), "warmup_epochs must not be negative, got -1"),
    (OptimConfig, dict(lr=1e-3, lr_floor=2e-3), "lr_floor must lie in [0, lr=0.001], got 0.002"),
    (OptimConfig, dict(grad_clip=-1.0), "grad_clip must not be negative (0 disables), got -1.0"),
    (OptimConfig, dict(lookahead_steps=-1), "lookahead_steps must be a non-negative integer, got -1"),
    (OptimConfig, dict(lookahead_alpha=0.0), "lookahead_alpha must lie in (0, 1], got 0.0"),
    (OptimConfig, dict(reorthogonalize_every=-5), "reorthogonalize_every must be a non-negative integer, got -5"),
    (OptimConfig, dict(ema_decay=1.0), "ema_decay must lie in [0, 1), got 1.0"),
    (LossConfig, dict(kind="ce"), "kind must be one of ('emma', 'offset_ce'), got 'ce'"),
    (LossConfig, dict(eps_train=-0.1), "eps_train must not be negative, got -0.1"),
    (LossConfig, dict(eps_start=-0.1), "eps_start must not be negative, got -0.1"),
    (LossConfig, dict(eps_peak=0.05), "eps_peak must be at least eps_start=0.1, got 0.05"),
    (LossConfig, dict(eps_ramp_fraction=1.5), "eps_ramp_fraction must lie in [0, 1], got 1.5"),
    (LossConfig, dict(temperature=0.0), "temperature must be positive, got 0.0"),
    (DataConfig, dict(batch_size=0), "batch_size must be positive, got 0"),
    (DataConfig, dict(augment="cropflip"), "augment must be one of ('crop_flip', 'crop_flip_randaugment', 'random_resized_crop', None), got 'cropflip'"),
    (DataConfig, dict(prefetch=0), "prefetch must be a positive integer, got 0"),
    (CheckpointConfig, dict(every_epochs=-1), "every_epochs must be a non-negative integer, got -1"),
    (CheckpointConfig, dict(keep=0), "keep must be a positive integer, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("section,changes,message", BAD_CONFIGS, ids=[next(iter(c)) for _, c, _ in BAD_CONFIGS])
def test_a_bad_config_value_is_refused_naming_the_field(section, changes, message):
    required = dict(model=preset("tiny")) if section is TrainConfig else {}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        section(**required, **changes)


def test_every_augmentation_of_the_registry_is_a_choice_of_the_config():
    assert get_args(get_type_hints(DataConfig)["augment"]) == (Augmentation, type(None))
    assert get_args(Augmentation) == tuple(AUGMENTATIONS)
    for name in AUGMENTATIONS:
        assert DataConfig(augment=name).augment == name


def test_train_config_round_trips_through_a_dict():
    config = TrainConfig(model=preset("digits"), data=DataConfig(uri="s3://b/d", batch_size=64), precision="bf16")
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_bf16_training_tracks_fp32_and_certifies_in_fp32(digits_shards):
    """bf16 compute over fp32 weights and optimizer state ends close to fp32
    training; evaluation runs fp32, so the certificate's bound is that of the
    fp32 weights (~1, not the ~1e-2 per-matrix error of bf16-rounded ones)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(
            model=preset("tiny"), data=DataConfig(uri=digits_shards, batch_size=100), epochs=3, precision=precision
        )
        runs[precision] = train(config, LocalSession(config.checkpoint))
    for key in ("eval/clean_acc", "eval/cra_36"):
        assert abs(runs["bf16"][key] - runs["fp32"][key]) <= 0.05, key
    assert runs["bf16"]["model/lipschitz_bound"] < 1.01 * runs["fp32"]["model/lipschitz_bound"]
