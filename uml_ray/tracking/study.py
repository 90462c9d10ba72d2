"""The study logger: ``uml-ray compare`` and ``uml-ray study`` as one parent run over their sweeps' runs."""

from __future__ import annotations

from uml_ray.errors import UserError
from uml_ray.tracking.loggers import SweepTracker
from uml_ray.tracking.tags import KIND_TAG, PARENT_TAG, STUDY_TAG


class StudyTracker(SweepTracker):
    """A study (``uml-ray compare``, ``uml-ray study``): one parent run over several sweeps. Each
    sweep's parent run (or a single training's run) becomes its child through ``mlflow.parentRunId``,
    so the MLflow UI nests study → sweep → trial. Its writes go through the outbox like a sweep's."""

    def start_study(self, kind: str, params: dict) -> str | None:
        """Open the study's run (tag ``uml_ray.kind=<kind>``) with its settings as params (None while
        held)."""
        self.outbox.send(
            "the study's run", lambda: self._create_parent({STUDY_TAG: self.sweep, KIND_TAG: kind}, params)
        )
        return self.parent_id

    def adopt(self, sweep: str) -> None:
        """Make the top run of ``sweep`` (its sweep parent run, or a single training's run) a child of
        the study."""

        def adopt_sweep():
            found = self.runs.top_run(sweep)
            if found is None:
                raise UserError(
                    f"no MLflow run of sweep '{sweep}' in the experiment; the study cannot record it"
                )
            self.client.set_tag(found.info.run_id, PARENT_TAG, self.parent_id)
            self.client.set_tag(found.info.run_id, STUDY_TAG, self.sweep)

        self.outbox.send(f"sweep {sweep}'s place in the study", adopt_sweep)

    def end_study(self, metrics: dict, tags: dict, artifacts: list[str], status: str = "FINISHED") -> None:
        """Close the study's run with its summary metrics, tags and artifacts (tables, plots); waits for
        held writes."""
        self._end_parent("the study's summary", metrics, tags, artifacts, status)
