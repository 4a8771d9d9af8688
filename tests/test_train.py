"""The training worker without Ray: its config, materialisation, resume, and its errors."""

import re
import shutil
from typing import get_args, get_type_hints

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from lipnext import LipNeXt, preset
from lipnext.augment import AUGMENTATIONS, Augmentation
from lipnext.checkpoint import latest, load_model
from lipnext.parallelize import apply_fsdp, materialize
from lipnext.ranks import run_ranks
from lipnext.train import LocalSession, train
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
    return TrainConfig(
        model=preset("tiny"),
        data=DataConfig(uri=data, batch_size=100),
        checkpoint=CheckpointConfig(dir=str(checkpoint_dir), keep=5),
        epochs=epochs,
    )


EVAL = ["eval/clean_acc", "eval/cra_36", "eval/cra_72", "train/loss", "model/lipschitz_bound"]


def test_a_run_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_one(digits_shards, tmp_path):
    session = LocalSession(_config(digits_shards, tmp_path / "a").checkpoint)
    uninterrupted = train(_config(digits_shards, tmp_path / "a"), session)
    assert len(session.history) == 3 and uninterrupted["eval/clean_acc"] > 0.5
    # A run that died after epoch 1: only its first checkpoint survived.
    shutil.copytree(sorted((tmp_path / "a").iterdir())[0], tmp_path / "b" / "step_1")
    resumed_session = LocalSession(_config(digits_shards, tmp_path / "b").checkpoint)
    resumed = train(_config(digits_shards, tmp_path / "b"), resumed_session)
    assert [m["epoch"] for m in resumed_session.history] == [2, 3]
    assert {k: resumed[k] for k in EVAL} == {k: uninterrupted[k] for k in EVAL}
    # The weights of the last checkpoint load into a plain model for evaluation.
    model = LipNeXt(preset("tiny"))
    load_model(model, latest(tmp_path / "b"))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), LipNeXt(preset("tiny")).parameters()))


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
    (OptimConfig, dict(warmup_fraction=1.0), "warmup_fraction must lie in [0, 1), got 1.0"),
    (OptimConfig, dict(grad_clip=-1.0), "grad_clip must not be negative (0 disables), got -1.0"),
    (OptimConfig, dict(lookahead_steps=-1), "lookahead_steps must be a non-negative integer, got -1"),
    (OptimConfig, dict(lookahead_alpha=0.0), "lookahead_alpha must lie in (0, 1], got 0.0"),
    (OptimConfig, dict(reorthogonalize_every=-5), "reorthogonalize_every must be a non-negative integer, got -5"),
    (OptimConfig, dict(ema_decay=1.0), "ema_decay must lie in [0, 1), got 1.0"),
    (LossConfig, dict(eps_train=-0.1), "eps_train must not be negative, got -0.1"),
    (LossConfig, dict(eps_ramp_fraction=1.5), "eps_ramp_fraction must lie in [0, 1], got 1.5"),
    (LossConfig, dict(temperature=0.0), "temperature must be positive, got 0.0"),
    (DataConfig, dict(batch_size=0), "batch_size must be positive, got 0"),
    (DataConfig, dict(augment="cropflip"), "augment must be one of ('crop_flip', 'random_resized_crop', None), got 'cropflip'"),
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
