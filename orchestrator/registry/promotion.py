"""Promotion: an eval gate decides, MLflow's model registry records (version + alias), SQL keeps why.

`decide` is pure (policy + metrics in, decision out; any recorded metric, each with its direction) so
the gate is tested without MLflow. `Registry` acts: after training it moves adapters to `evaluated`,
promotes those whose job asks for `auto` promotion, and promotes by hand (`lorafleet promote`), gated
unless forced. A registered model is named `<project>.<adapter>`; each promotion adds a model version
whose source is the adapter run's artifacts and moves the alias (MLflow aliases, not the deprecated
stages). A failed gate records `rejected` with its reason and sets no alias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.lineage.tree import lineage_path
from orchestrator.spec.job import LOSS_METRICS, PromotionPolicy, lower_is_better
from orchestrator.spec.states import ADAPTER_TRAINED, AdapterState
from orchestrator.store import AdapterRecord, RegistryRecord, Store
from orchestrator.tracking.mirror import Tracker
from workers.contract.plan import perplexity

PARENT_PREFIX = "parent_"


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    metric: str
    value: float | None
    reason: str


def parent_value(metric: str, metrics: Mapping[str, float]) -> float | None:
    """The parent's `metric` on the child's own eval records (`parent_<metric>`, recorded by the child's
    final eval); a perplexity from the parent's loss when only that was recorded."""
    value = metrics.get(PARENT_PREFIX + metric)
    if value is None and metric == "perplexity" and PARENT_PREFIX + "eval_loss" in metrics:
        value = perplexity(metrics[PARENT_PREFIX + "eval_loss"])
    return value if value is not None and math.isfinite(value) else None


def _missing(metric: str) -> str:
    if metric in LOSS_METRICS:
        return f"no `{metric}`: give the adapter eval data (`data.eval_path` or `data.eval_fraction`)"
    return (
        f"no `{metric}` recorded: give the adapter eval data (`data.eval_path` or `data.eval_fraction`) "
        "of prompt/completion or messages records, with `eval.max_examples` above 0"
    )


def decide(policy: PromotionPolicy, metrics: Mapping[str, float], has_parent: bool) -> GateDecision:
    """Apply the job's promotion policy to an adapter's latest metrics.

    Any recorded metric can gate: a loss or perplexity improves downwards, a score or accuracy upwards
    (`lower_is_better`), and `min`/`max` bound it either way. A branched adapter must beat its parent on
    its own eval data (`parent_<metric>`, measured on the same records) unless the policy says
    `better_than_parent: false`: with no condition at all, any child would pass and replace a better
    parent. Every reason names the metric and both values it compared."""
    metric = policy.metric
    value = metrics.get(metric)
    if value is None or not math.isfinite(value):
        return GateDecision(False, metric, None, _missing(metric))
    checks = []
    if policy.max is not None:
        if value > policy.max:
            return GateDecision(False, metric, value, f"{metric} {value:.4f} > max {policy.max}")
        checks.append(f"{metric} {value:.4f} <= max {policy.max}")
    if policy.min is not None:
        if value < policy.min:
            return GateDecision(False, metric, value, f"{metric} {value:.4f} < min {policy.min}")
        checks.append(f"{metric} {value:.4f} >= min {policy.min}")
    if has_parent and policy.better_than_parent is not False:  # unset: a child must beat its parent
        parent = parent_value(metric, metrics)
        if parent is None:
            return GateDecision(
                False,
                metric,
                value,
                f"the parent's {metric} was not measured on this adapter's eval data; set "
                "`promotion.better_than_parent: false` to promote without comparing",
            )
        beats = value < parent if lower_is_better(metric) else value > parent
        if not beats:
            return GateDecision(
                False,
                metric,
                value,
                f"{metric} {value:.4f} does not beat the parent's {metric} {parent:.4f} on the same "
                "eval data",
            )
        checks.append(f"{metric} {value:.4f} beats the parent's {parent:.4f}")
    return GateDecision(True, metric, value, "; ".join(checks) or "no gate conditions set")


def registered_model_name(adapter: AdapterRecord) -> str:
    return f"{adapter.project}.{adapter.name}"


class Registry:
    def __init__(self, store: Store, tracker: Tracker) -> None:
        self.store = store
        self.tracker = tracker

    def _policy(self, adapter: AdapterRecord) -> PromotionPolicy:
        return self.store.get_job(adapter.job_id).job_spec.promotion

    def settle(self) -> None:
        """Auto-promotion: evaluated adapters of jobs that ask for it are judged by the gate, once the
        mirror has synced (the run and its artifacts must exist before a model version points at them)."""
        policies: dict[str, PromotionPolicy] = {}
        for adapter in self.store.list_adapters(states=[AdapterState.EVALUATED]):
            if adapter.job_id not in policies:
                policies[adapter.job_id] = self._policy(adapter)
            if policies[adapter.job_id].auto:
                self.promote(adapter.id)

    def promote(self, adapter_id: str, alias: str | None = None, force: bool = False) -> RegistryRecord:
        """Judge and register under the mirror's lock: two promotions (or a promotion and the mirror)
        at once would each create the adapter's run or the registered model, and one would lose."""
        with self.tracker.lock:
            return self._promote(adapter_id, alias, force)

    def _promote(self, adapter_id: str, alias: str | None, force: bool) -> RegistryRecord:
        adapter = self.store.get_adapter_by_id(adapter_id)
        if adapter.state not in ADAPTER_TRAINED:
            raise ValueError(
                f"adapter {adapter.qualified_name} is {adapter.state}; only a trained adapter "
                "can be promoted: wait for it to finish"
            )
        policy = self._policy(adapter)
        alias = alias or policy.alias
        metrics = {m.key: m.last_value for m in self.store.get_metrics(adapter.id)}
        if adapter.eval_loss is not None:
            metrics.setdefault("eval_loss", adapter.eval_loss)
        gate = decide(policy, metrics, adapter.parent_id is not None)
        if not gate.passed and not force:
            return self.store.record_registry_decision(
                adapter.id,
                AdapterState.REJECTED,
                metric=gate.metric,
                value=gate.value,
                reason=gate.reason,
                transition=adapter.state != AdapterState.PROMOTED,
            )
        name, version = self._register(adapter, metrics, alias)
        reason = gate.reason if gate.passed else f"forced past a failed gate: {gate.reason}"
        return self.store.record_registry_decision(
            adapter.id,
            AdapterState.PROMOTED,
            model_name=name,
            version=version,
            alias=alias,
            metric=gate.metric,
            value=gate.value,
            reason=reason,
            transition=adapter.state != AdapterState.PROMOTED,
        )

    def _register(self, adapter: AdapterRecord, metrics: Mapping[str, float], alias: str) -> tuple[str, int]:
        """A new model version from the adapter run's artifacts, and the alias moved onto it."""
        from mlflow.exceptions import MlflowException

        self.tracker.sync()  # the adapter's run and its artifacts must exist before we point at them
        adapter = self.store.get_adapter_by_id(adapter.id)
        client = self.tracker.client
        name = registered_model_name(adapter)
        try:  # registering a model that already exists (another server got there first) is no error
            client.create_registered_model(
                name, tags={"lorafleet.project": adapter.project, "lorafleet.base_model": adapter.base_model}
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        lineage = lineage_path(self.store, adapter)
        tags = {
            "lorafleet.base_model": adapter.base_model,
            "lorafleet.lineage_path": lineage,
            "lorafleet.job": adapter.job_id,
            "lorafleet.config_hash": adapter.config_hash,
            **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
        }
        if adapter.mlflow_run_id:
            source = f"{client.get_run(adapter.mlflow_run_id).info.artifact_uri}/adapter"
        else:
            source = str(adapter.final_checkpoint)
        version = client.create_model_version(name, source, run_id=adapter.mlflow_run_id, tags=tags)
        client.set_registered_model_alias(name, alias, version.version)
        return name, int(version.version)
