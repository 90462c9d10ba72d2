"""The driver: the run plan (checked before Ray starts), Tune + Optuna + ASHA, the MLflow bridge, the summary.

``train`` never imports from here: the driver calls down into ``uml_ray.train.runner``.
"""
