"""The adapter tree across jobs: who started from whom.

Every adapter row carries `parent_id`, `root_id` and `depth`, so a whole tree is one indexed query
(`Store.subtree(root_id)`) and the rest is done here in memory: the path from the root, the descendants,
and the nested view that `lorafleet lineage` draws.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.spec.views import LineageNode
from orchestrator.store import AdapterRecord, Store

MetricsFn = Callable[[str], dict[str, float]]


def tree_of(store: Store, adapter: AdapterRecord) -> list[AdapterRecord]:
    """Every node of the tree `adapter` belongs to (roots and children across all jobs)."""
    return store.subtree(adapter.root_id)


def path_from_root(store: Store, adapter: AdapterRecord) -> list[AdapterRecord]:
    return [*store.ancestors(adapter.id), adapter]


def lineage_path(store: Store, adapter: AdapterRecord, qualified: bool = False) -> str:
    """`root/child/adapter`: the tag MLflow runs and model versions carry, and the export card's line."""
    return "/".join(a.qualified_name if qualified else a.name for a in path_from_root(store, adapter))


def descendants(nodes: list[AdapterRecord], adapter_id: str) -> list[AdapterRecord]:
    """All nodes below `adapter_id` in `nodes` (one tree), parents before children."""
    children = _children(nodes)
    out: list[AdapterRecord] = []
    frontier = list(children.get(adapter_id, []))
    while frontier:
        node = frontier.pop(0)
        out.append(node)
        frontier.extend(children.get(node.id, []))
    return out


def nested(nodes: list[AdapterRecord], root_id: str, metrics: MetricsFn) -> LineageNode:
    """The nested `{name, parent, status, metrics, children}` view, from `root_id` down."""
    children = _children(nodes)
    by_id = {n.id: n for n in nodes}

    def build(node: AdapterRecord) -> LineageNode:
        parent = by_id.get(node.parent_id or "")
        return LineageNode(
            name=node.qualified_name,
            parent=parent.qualified_name if parent else None,
            status=node.state,
            metrics=metrics(node.id),
            children=[build(c) for c in children.get(node.id, [])],
        )

    return build(by_id[root_id])


def _children(nodes: list[AdapterRecord]) -> dict[str | None, list[AdapterRecord]]:
    children: dict[str | None, list[AdapterRecord]] = {}
    for node in sorted(nodes, key=lambda n: (n.depth, n.seq)):
        children.setdefault(node.parent_id, []).append(node)
    return children
