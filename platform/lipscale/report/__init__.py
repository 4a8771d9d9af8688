"""Scaling laws of a finished study, and its report.

    lipscale fit studies/specs/digits.yaml      # the fits, with intervals, and the 1B/2B extrapolation
    lipscale report studies/specs/digits.yaml   # the same, plus plots (PNG, one HTML page) logged to MLflow

- rows.py: one row per finished trial, from <root>/results.parquet, or from the
  study's MLflow child runs where that table is missing (the parent run's id is
  in the Optuna study's user attrs), with the accuracies at the common epoch;
- laws.py: the fits and their printout;
- figures.py: what the plots show (plots.py draws them: PNG and plotly), and
  the files of the report;
- command.py: `lipscale fit` and `lipscale report`.

Fitted over the COMPLETE and PRUNED trials, each with lipscale.scaling's
saturating power law err = E + A x^-alpha, for err = 1 - eval/cra_{36,72,108,255}
and 1 - eval/clean_acc:

- against N = model/params (every parameter: stem, blocks and head), with every
  trial's errors at one epoch: the last that all of them were evaluated at,
  read from their MLflow runs' histories. ASHA stops most trials early (the
  default study: 6 of 8 at epoch 10), and a stopped trial's final error is
  that of less training, not of its size; at a common epoch all trials have
  trained alike (on the same schedule, which is not over for any but the last);
- against C = training compute, with each trial's final errors (compute counts
  how long it trained): C = model/flops_per_sample x train/samples, the samples
  the trial's training loop saw over all its ranks, as it reports them.
  model/flops_per_sample counts forward and backward matrix products
  (FlopCounterMode), not the optimizer's update, nor evaluation.

Other searched settings (beta, shift pattern, learning rate, ...) vary between
trials and count as noise around each law. A metric that cannot be fitted
(too few sizes, constant, no finite values) is reported with the reason.
The laws in N are extrapolated to the imagenet-1b and imagenet-2b presets,
which lie far beyond any small study's sizes and on another dataset: the
printout says by how far.
"""
