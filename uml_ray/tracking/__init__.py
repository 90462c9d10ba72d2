"""Tracking: MLflow runs, metrics, artifacts and best-config queries.

``store`` (the connection; the only module that imports MLflow), ``tags`` (tag names), ``outbox``
(writes held through a server outage), ``runs`` (run queries, ``uml-ray best``), ``loggers``
(``SweepTracker``), ``study`` (``StudyTracker``), ``commands`` (the ``best`` command).
"""
