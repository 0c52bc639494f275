"""An adapter's family: its lineage tree, and branching a child from it."""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.server.deps import Caller, Svc, named
from orchestrator.service.auth import Principal, require_change
from orchestrator.spec.job import BranchSpec
from orchestrator.spec.views import JobView, LineageNode

router = APIRouter()


@router.get("/v1/adapters/{project}/{name}/lineage")
def lineage(project: str, name: str, service: Svc, caller: Caller) -> LineageNode:
    with named(service, caller, project, name):
        return visible_tree(service.lineage(project, name), caller, f"{project}/{name}")


@router.post("/v1/adapters/{project}/{name}/branch", status_code=201)
def branch(project: str, name: str, body: BranchSpec, service: Svc, caller: Caller) -> JobView:
    with named(service, caller, project, name):
        require_change(caller, project)
        return service.branch(project, name, body, caller)


def visible_tree(root: LineageNode, caller: Principal, target: str) -> LineageNode:
    """A tree can span projects (an admin may branch a child from another project's adapter): show the
    caller only its own part. The shown tree starts at the highest node above `target` reached through
    nodes the caller sees alone, so it always holds `target` and never a name of a project the caller
    cannot read (an ancestor's, a parent's, or a child's and what hangs below it)."""

    def sees(node: LineageNode) -> bool:
        return caller.sees(node.name.partition("/")[0])

    def prune(node: LineageNode) -> LineageNode:
        children = [prune(c) for c in node.children if sees(c)]
        parent = node.parent if node.parent is None or caller.sees(node.parent.partition("/")[0]) else None
        return node.model_copy(update={"children": children, "parent": parent})

    def path_to(node: LineageNode) -> list[LineageNode] | None:
        if node.name == target:
            return [node]
        for child in node.children:
            found = path_to(child)
            if found is not None:
                return [node, *found]
        return None

    path = path_to(root) or [root]
    top = len(path) - 1
    while top > 0 and sees(path[top - 1]):
        top -= 1
    return prune(path[top])
