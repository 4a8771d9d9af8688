"""LipScale: the study platform (Ray Tune + Optuna sweeps, MLflow tracking, scaling-law fits)."""
