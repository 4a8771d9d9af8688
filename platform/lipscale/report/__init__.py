"""Scaling laws of a finished study, and its report.

    lipscale fit studies/specs/shapes.yaml      # the fits, their validation, the 1B/2B extrapolation beside it
    lipscale report studies/specs/shapes.yaml   # the same, plus plots (PNG, one HTML page) logged to MLflow

- rows.py: one row per finished trial, from <root>/results.parquet, or from the
  study's MLflow child runs where that table is missing (the parent run's id is
  in the Optuna study's user attrs), with its size, compute and why it is left
  out of the envelope, if it is;
- laws.py: the fits and their printout;
- figures.py: what the plots show (plots.py draws them: PNG and plotly), and
  the files of the report;
- command.py: `lipscale fit` and `lipscale report`.

A law is fitted to the envelope: each size's best trial (by the study's first
objective) among those trained to their full budget. A trial ASHA stopped
early, a FAILed one, one without the objective, and the other points of a
size's sweep are left out, and the printout counts them by reason: a stopped
trial's error is that of less training, not of its size. Each accuracy's law
err = E + A x^-alpha (lipscale.scaling; `--link logit` for the odds, and
`--shared-exponent` for one alpha across eps), for err = 1 - eval/cra_{36,72,
108,255} and 1 - eval/clean_acc, is fitted

- against N = model/params (every parameter: stem, blocks and head);
- against C = training compute, model/flops_per_sample x train/samples, the
  samples the trial's training loop saw over all its ranks, as it reports them.
  model/flops_per_sample counts forward and backward matrix products
  (FlopCounterMode), not the optimizer's update, nor evaluation.

with bootstrap intervals, and checked by fitting it without the largest size:
the verdict says whether that size's measured error lies inside the interval
the others predict. The laws in N are extrapolated to the imagenet-1b and
imagenet-2b presets only beside that verdict and the decades they reach beyond
the data (and another dataset). An IsoFLOP study (lipscale.design) gets its
curves, each budget's compute-optimal size and N_opt = k C^a instead. A metric
that cannot be fitted (too few sizes, constant, no finite values) is reported
with the reason.
"""
