"""LipNeXt: the model, its certificate, the manifold optimizer and the training worker.

One concern per module, torch-only at the bottom, Ray only at the edge:

    config, model, layers      the model (LipNeXtConfig, presets, plain PyTorch)
    certify                    its certificate: Certificate, certified_radius, the loss's margin
    manifold, owner_exchange   ManifoldAdamW on the orthogonal manifold; whole matrices on owner ranks
    parallelize                FSDP2 sharding and materialisation of a model built on meta
    metrics                    the names a trial reports (the contract the platform reads)
    train_config               TrainConfig: the one typed, validated config of a run
    data, loader, augment      the shard format; the rank-aware ShardLoader; batch augmentations
    checkpoint                 DCP checkpoints that resume bit for bit and rebuild their model
    train, session             build_model / build_optimizer / train_step and the loop; Ray or local edges
    ranks                      run_ranks: a function on N local gloo ranks (tests, benchmarks)
"""

from lipnext.config import PRESETS, LipNeXtConfig, preset
from lipnext.model import LipNeXt, param_counts

__all__ = ["PRESETS", "LipNeXt", "LipNeXtConfig", "param_counts", "preset"]
