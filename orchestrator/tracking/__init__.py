"""The MLflow mirror: a projection of SQL's event log into runs, metrics and artifacts."""
