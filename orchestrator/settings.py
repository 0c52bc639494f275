"""Where lorafleet keeps its state: one `LORAFLEET_HOME` for the embedded default, URLs for a cluster.

Embedded (nothing to start by hand): SQLite `lorafleet.db`, MLflow `mlflow.db` and `artifacts/` under the
home, and a local Ray started on demand. A cluster sets `LORAFLEET_DB_URL` (PostgreSQL),
`LORAFLEET_MLFLOW_URI`, `LORAFLEET_RAY_ADDRESS` and `LORAFLEET_STORAGE` (a filesystem path every Ray node
mounts, or an object-store URI such as `s3://bucket/prefix`: see `workers.storage`). Several homes can
live side by side: everything derives from the one variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers import storage

PathList = Annotated[list[Path] | None, NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".lorafleet")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite under home.")
    mlflow_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: SQLite under home."
    )
    ray_address: str | None = Field(default=None, description="Ray cluster address; default: local Ray.")
    storage: str | None = Field(
        default=None,
        description="Adapters, checkpoints, event logs and Ray Train runs: a path every Ray node mounts or "
        "an object-store URI (`s3://bucket/prefix`, credentials from the standard AWS variables).",
    )
    api_token: str | None = Field(default=None, description="Bearer token the API server requires.")
    ray_num_cpus: int | None = Field(default=None, description="CPUs of the embedded local Ray.")
    tick_seconds: float = Field(default=0.5, description="Controller loop period.")
    data_roots: PathList = Field(
        default=None,
        description="Directories (':'-separated) data paths must resolve into, symlinks followed; "
        "unset: any path the server can read (fine for one user, not for a shared server).",
    )
    model_roots: PathList = Field(
        default=None, description="Directories (':'-separated) a local `base_model`/`tokenizer` must be in."
    )
    allowed_models: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Hub ids (','-separated, shell patterns like 'Qwen/*') a spec may name; unset: any.",
    )
    allow_user_scorers: bool | None = Field(
        default=None,
        description="Whether a spec may name a `module:function` eval scorer, which runs the submitter's "
        "code in the workers. Unset: the admin may (embedded use, a home's local service, the admin "
        "token), a project token may not (on a shared server that code would run next to every other "
        "tenant's data and weights); true: every caller; false: none.",
    )
    project_max_adapters: int | None = Field(
        default=None,
        ge=0,
        description="Most adapters one project may train at once (all its jobs, all packs); unset: no cap.",
    )
    project_caps: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="Per-project overrides of `project_max_adapters`: 'team-a=16,team-b=2'.",
    )
    yield_after_seconds: float | None = Field(
        default=600.0,
        ge=0,
        description="An adapter that trained this long in its pack yields (checkpointed, back to the "
        "queue) when another project's (or job's) adapters wait with no worker free and it holds more "
        "than a fair share; 'off': never.",
    )

    max_adapters_per_job: int = Field(
        default=1000,
        gt=0,
        description="Adapters one job spec may hold: submitting, listing and cancelling cost grows with it.",
    )
    max_train_steps: int = Field(default=1_000_000, gt=0, description="Most `train.steps` per adapter.")
    max_tokens_per_adapter: int = Field(
        default=10_000_000_000,
        gt=0,
        description="Most tokens one adapter may train on: steps x batch_size x grad_accum_steps x "
        "max_seq_len (the padded budget, known at submit; what a step can cost at most).",
    )
    max_record_bytes: int = Field(
        default=1 << 20,
        gt=0,
        description="Largest record (one JSON line, one CSV row) a data file may hold; checked at submit "
        "on the first records without reading past the limit, and on every record by the worker.",
    )
    job_view_adapters: int = Field(
        default=100,
        ge=0,
        description="Adapters a job's view embeds (the first ones, FIFO); counts by state cover all, and "
        "`GET /v1/adapters?job_id=` pages through the rest.",
    )

    session_idle_seconds: float = Field(
        default=900.0,
        gt=0,
        description="A training session with no call for this long, and nothing queued, is closed (its "
        "adapter detached, its memory freed): a client that vanished does not hold the worker.",
    )
    session_hosts: Literal["auto", "ray", "local"] = Field(
        default="auto",
        description="Where sessions' hosts (a loaded base and its sessions) run: 'ray', each in a Ray actor "
        "on a worker slot the controller counts against packs (a lost worker costs its sessions the "
        "steps since their last save_state, see `service.session_hosts`); 'local', in the server's "
        "process; 'auto', in Ray actors when the server runs its packs on Ray, else local.",
    )
    session_host_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory one session host may use (its base, a pass, its sessions' adapters and AdamW "
        "state); unset: a GPU worker's default, or on CPU a share of the machine's RAM as a pack's "
        "worker gets.",
    )
    sessions_per_host: int = Field(
        default=32,
        gt=0,
        description="Most sessions one host holds: more share each clock cycle, so each waits longer.",
    )
    sessions_per_project: int | None = Field(
        default=None,
        ge=0,
        description="Most live sessions one project may hold; a create beyond it is refused (429). "
        "Unset: no cap.",
    )
    session_host_start_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a new Ray session host may take to be scheduled and load its base; past "
        "it the host is given up and the create answers 503 (the cluster's workers are held elsewhere).",
    )
    session_host_linger_seconds: float = Field(
        default=300.0,
        ge=0,
        description="A host with no session left stays this long (a new session on its base starts "
        "without loading it again), then closes and frees its worker.",
    )

    @field_validator("data_roots", "model_roots", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [Path(p).expanduser().resolve() for p in value.split(":") if p.strip()]
        return value

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("project_caps", mode="before")
    @classmethod
    def _split_caps(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        caps: dict[str, int] = {}
        for item in (p.strip() for p in value.split(",")):
            if not item:
                continue
            project, sep, number = item.partition("=")
            if not sep or not project.strip() or not number.strip().isdigit():
                raise ValueError(
                    f"LORAFLEET_PROJECT_CAPS item {item!r} is not 'project=N' (N a whole number >= 0); "
                    "write e.g. 'team-a=16,team-b=2'"
                )
            caps[project.strip()] = int(number)
        return caps

    @field_validator("yield_after_seconds", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none") else value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if self.db_url is None:
            self.db_url = f"sqlite:///{self.home / 'lorafleet.db'}"
        if self.mlflow_uri is None:
            self.mlflow_uri = f"sqlite:///{self.home / 'mlflow.db'}"
        if self.storage is None:
            self.storage = str(self.home / "artifacts")
        elif not storage.is_remote(self.storage):
            self.storage = str(Path(self.storage).expanduser().resolve())
        return self

    def user_scorers_allowed(self, admin: bool) -> bool:
        """`allow_user_scorers` for a caller: unset, only the admin may run its own scorer code."""
        return admin if self.allow_user_scorers is None else self.allow_user_scorers

    @property
    def database_url(self) -> str:
        assert self.db_url is not None
        return self.db_url

    @property
    def storage_root(self) -> str:
        assert self.storage is not None
        return self.storage

    @property
    def export_staging(self) -> Path:
        """Where the server builds an export before sending it: under storage when storage is a
        filesystem, else under home (an archive must be a local file)."""
        if storage.is_remote(self.storage_root):
            return self.home / "exports"
        return Path(self.storage_root) / "exports"

    @property
    def mlflow_artifact_root(self) -> Path | None:
        """Where the embedded MLflow keeps artifacts; a remote tracking server decides for itself."""
        uri = str(self.mlflow_uri)
        return self.home / "mlflow-artifacts" if uri.startswith(("sqlite:", "file:", "/")) else None

    def adapter_dir(self, project: str, name: str) -> str:
        return storage.join(self.storage_root, "adapters", project, name)
