"""Who may do what on a server: the admin token, project tokens and their roles, as pure rules.

- The admin token (`LORAFLEET_API_TOKEN`; for a home's local service, the home's own token) sees and
  changes everything, and alone manages tokens.
- A project token (`lorafleet token create --project P`) is bound to one project. A `member` reads and
  changes that project (submit, branch, cancel, promote); a `reader` only reads (lists, status, lineage,
  export, generate). Anything of another project answers exactly as if it did not exist (404, absent
  from lists), so a token holder cannot even learn which names others use. That includes a spec's
  `parent: other/name`: a project token finds parents in its own project only. The admin alone may start
  a child from another project's adapter, and so share its weights with the child's project.
- A server started without an admin token is open (everyone is admin): fine on a laptop, and the server
  says so in its log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "member", "reader"]


@dataclass(frozen=True)
class Principal:
    role: Role
    project: str | None = None  # None: every project (admin)
    token_id: str | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def sees(self, project: str) -> bool:
        return self.admin or project == self.project

    def may_change(self, project: str) -> bool:
        return self.admin or (self.role == "member" and project == self.project)

    def scope(self, project: str | None) -> str | None:
        """The project filter a listing must use: a project token lists its own project only."""
        return project if self.admin else self.project


ADMIN = Principal("admin")


class Forbidden(PermissionError):
    """The caller is known but may not do this (a reader changing things, a member of another project
    submitting, a project token managing tokens): 403 with the reason."""


def require_change(principal: Principal, project: str) -> None:
    if principal.may_change(project):
        return
    if principal.sees(project):
        raise Forbidden(f"this token is a reader of project {project!r}; it cannot change anything")
    raise Forbidden(
        f"this token belongs to project {principal.project!r}; it cannot submit or change jobs of "
        f"project {project!r}"
    )


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("managing tokens needs the admin token (LORAFLEET_API_TOKEN)")
