-- Runs once, when the postgres-data volume is created: MLflow keeps its tables in their own database.
CREATE DATABASE mlflow OWNER lorafleet;
