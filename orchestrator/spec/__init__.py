"""What users write and read: the job spec, the states of jobs and adapters, and the views every
surface (API, client, CLI) returns. Imports nothing else of the control plane."""
