"""Presets: exact parameter counts, counted on the meta device for free."""

import resource
import time

import pytest
import torch

from lipnext import PRESETS, LipNeXt, LipNeXtConfig, param_counts, preset

BLOCK_WEIGHTS = {  # 2 * L * W^2
    "cifar-l32w1024": 67_108_864,
    "cifar-l32w2048": 268_435_456,
    "tinyimagenet-l32w2048": 268_435_456,
    "imagenet-1b": 1_073_741_824,
    "imagenet-2b": 2_147_483_648,
}


@pytest.mark.parametrize("name", BLOCK_WEIGHTS)
def test_paper_presets_have_exactly_2LW2_block_weights(name):
    counts = param_counts(preset(name))
    assert counts["block_weights"] == BLOCK_WEIGHTS[name]
    extra = counts["stem"] + counts["head"] + counts["block_other"]
    assert counts["total"] == counts["block_weights"] + extra
    assert extra < 0.01 * counts["total"]  # stem, head, biases, positions are small


def test_building_imagenet_2b_on_meta_takes_seconds_and_no_memory():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.device("meta"):
        model = LipNeXt(preset("imagenet-2b"))
    assert time.perf_counter() - start < 10
    assert sum(p.numel() for p in model.parameters()) > 2.1e9
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 50  # the fp32 weights alone would be 8 GiB


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_forward_on_meta(name):
    config = preset(name)
    with torch.device("meta"):
        logits = LipNeXt(config)(torch.empty(2, config.in_channels, config.image_size, config.image_size))
    assert logits.shape == (2, config.num_classes)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(width=36), "width"),  # 36 / 8 channels per shift direction
        (dict(beta=1.5), "beta"),
        (dict(beta=0.3), "beta"),  # 0.3 * 32 channels
        (dict(patch_size=3), "patch_size"),
        (dict(shift_pattern="diagonal"), "shift_pattern"),
        (dict(shift_ratio=0.3), "shift_ratio"),
        (dict(depth=0), "depth"),
        (dict(input_std=(0.0,)), "input_std"),
        (dict(input_mean=(0.1, 0.2)), "input_mean"),
    ],
)
def test_impossible_configs_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="imagenet-1b"):
        preset("imagenet-3b")


def test_config_round_trips_through_a_dict():
    config = preset("digits", beta=0.25)
    assert LipNeXtConfig(**config.to_dict()) == config
