"""Studies: the comparison grid (protocols x strategies x seeds, plus joint and random init) as one
Ray Tune experiment, and the table, figures and MLflow run that summarize it."""

from streamssl.study.runner import run_study, write_outputs
from streamssl.study.spec import Cell, StudySpec, load_study

__all__ = ["Cell", "StudySpec", "load_study", "run_study", "write_outputs"]
