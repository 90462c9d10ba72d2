"""MLflow tag names: how uml-ray labels its runs, in one place for the writers and the readers.

Runs are found again by these tags (a resumed sweep's trial, a study's sweeps, ``uml-ray best``),
so a name changed here changes what earlier stores can be searched for.
"""

SWEEP_TAG = "uml_ray.sweep"  # the sweep (or single training) a run belongs to
KIND_TAG = "uml_ray.kind"  # sweep, trial, train, or a study's kind (compare, conversion)
TRIAL_TAG = "uml_ray.trial_id"  # the run key: Tune's trial id, or a fused trial's member id
FUSED_TRIAL_TAG = "uml_ray.fused_trial"  # a member's fused Tune trial
CONTINUES_TRIAL_TAG = "uml_ray.continues_trial"  # the trial id an adopted orphan run had before
OUTCOME_TAG = "uml_ray.outcome"  # finished, stopped_early, pruned, diverged, failed, lost
DIVERGED_STEP_TAG = "uml_ray.diverged_step"  # a diverged run's validation step where its loss diverged
DIVERGED_LOSS_TAG = "uml_ray.diverged_loss"  # that loss, as text: inf and nan are no MLflow metric
SAMPLED_TAG = "uml_ray.sampled"  # the sampled params as JSON
SEED_TAG = "uml_ray.seed"  # train.seed, with the run from its creation
DATA_TAG = "uml_ray.data"  # the dataset's fingerprint (data.identity): which data a trial trained on
STUDY_TAG = "uml_ray.study"  # a study's name, on its run and on each sweep it adopted
SWEEPS_TAG = "uml_ray.sweeps"  # a study's sweeps as JSON
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests runs in its UI


def best_tag(key: str) -> str:
    """The tag holding one value of a sweep's best config on its parent run."""
    return f"uml_ray.best.{key}"
