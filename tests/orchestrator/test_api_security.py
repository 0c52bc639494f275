"""The server as an attacker and a careless user meet it: project tokens and what they may see, paths
outside the server's roots, oversized or malformed requests, values that once caused 500s.

The app runs in-process (FastAPI's TestClient over the real ASGI app, real SQLite store, no controller):
nothing here needs training, only the API's answers and what it stored.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orchestrator.server.app import create_app
from orchestrator.settings import Settings
from orchestrator.store import AdapterChange

ADMIN = "admin-secret"


@pytest.fixture
def roots(tmp_path: Path, tiny_base: Path) -> dict[str, Path]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.csv").write_text("text\nhunter2\n")
    (data / "sneaky.jsonl").symlink_to(secret / "passwords.csv")
    return {"data": data, "secret": secret, "models": tiny_base.parent}


@pytest.fixture
def api(tmp_path: Path, roots: dict[str, Path]):
    settings = Settings(
        home=tmp_path / "home",
        api_token=ADMIN,
        data_roots=str(roots["data"]),
        model_roots=str(roots["models"]),
        allowed_models="Qwen/*",
    )
    settings.home.mkdir()
    with TestClient(create_app(settings, start_controller=False)) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def spec(project: str, base: Path, data: Path, name: str = "job", adapter: str = "a") -> dict:
    return {
        "name": name,
        "project": project,
        "base_model": str(base),
        "adapters": [{"name": adapter, "data": {"path": str(data)}}],
    }


def token(api: TestClient, project: str, role: str = "member") -> str:
    made = api.post("/v1/tokens", json={"project": project, "role": role}, headers=auth(ADMIN))
    assert made.status_code == 201, made.text
    return made.json()["token"]


def test_project_tokens_see_and_change_only_their_project(
    api: TestClient, tiny_base: Path, roots: dict[str, Path]
) -> None:
    data = roots["data"] / "a.jsonl"
    alice, bob = token(api, "alice"), token(api, "bob")
    mine = api.post("/v1/jobs", json=spec("alice", tiny_base, data), headers=auth(alice))
    theirs = api.post("/v1/jobs", json=spec("bob", tiny_base, data), headers=auth(bob))
    assert mine.status_code == theirs.status_code == 201
    job, other = mine.json()["id"], theirs.json()["id"]

    assert [j["id"] for j in api.get("/v1/jobs", headers=auth(alice)).json()] == [job]
    assert api.get("/v1/jobs", params={"project": "bob"}, headers=auth(alice)).json() == []
    assert {a["project"] for a in api.get("/v1/adapters", headers=auth(alice)).json()} == {"alice"}
    # another project's things answer exactly as if they did not exist
    missing = api.get("/v1/jobs/no-such-job", headers=auth(alice))
    hidden = api.get(f"/v1/jobs/{other}", headers=auth(alice))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["detail"]["message"] == f"job {other!r} not found"
    for path in ("", "/lineage", "/export"):
        assert api.get(f"/v1/adapters/bob/a{path}", headers=auth(alice)).status_code == 404
    assert api.get(f"/v1/jobs/{other}/events", headers=auth(alice)).status_code == 404
    assert api.post(f"/v1/jobs/{other}/cancel", headers=auth(alice)).status_code == 404
    assert api.post("/v1/adapters/bob/a/promote", json={}, headers=auth(alice)).status_code == 404
    # submitting into another project is refused, and stores nothing
    refused = api.post("/v1/jobs", json=spec("bob", tiny_base, data, "x", "b"), headers=auth(alice))
    assert refused.status_code == 403 and "alice" in refused.json()["detail"]["message"]
    assert len(api.get("/v1/jobs", headers=auth(ADMIN)).json()) == 2
    # the admin sees everything; project tokens cannot manage tokens
    assert {j["project"] for j in api.get("/v1/jobs", headers=auth(ADMIN)).json()} == {"alice", "bob"}
    assert api.get("/v1/tokens", headers=auth(alice)).status_code == 403
    bad = api.post("/v1/tokens", json={"project": "Bad Name"}, headers=auth(ADMIN))
    assert bad.status_code == 422 and "project" in bad.text


def test_readers_read_and_revoked_or_wrong_tokens_get_401(
    api: TestClient, tiny_base: Path, roots: dict[str, Path]
) -> None:
    data = roots["data"] / "a.jsonl"
    member, reader = token(api, "team"), token(api, "team", "reader")
    job = api.post("/v1/jobs", json=spec("team", tiny_base, data), headers=auth(member)).json()["id"]
    assert api.get(f"/v1/jobs/{job}", headers=auth(reader)).status_code == 200
    assert api.post(f"/v1/jobs/{job}/cancel", headers=auth(reader)).status_code == 403
    assert (
        api.post("/v1/jobs", json=spec("team", tiny_base, data, "j2", "b"), headers=auth(reader)).status_code
        == 403
    )
    listed = api.get("/v1/tokens", headers=auth(ADMIN)).json()
    assert {t["role"] for t in listed} == {"member", "reader"} and all("token" not in t for t in listed)
    reader_id = next(t["id"] for t in listed if t["role"] == "reader")
    assert api.delete(f"/v1/tokens/{reader_id}", headers=auth(ADMIN)).status_code == 200
    assert api.get(f"/v1/jobs/{job}", headers=auth(reader)).status_code == 401
    assert api.get("/v1/jobs").status_code == 401
    assert api.get("/v1/jobs", headers=auth("lft_guess")).status_code == 401
    assert api.get("/healthz").status_code == 200


def test_paths_outside_the_roots_are_refused_alike_whether_or_not_they_exist(
    api: TestClient, tiny_base: Path, roots: dict[str, Path], tmp_path: Path
) -> None:
    answers = {}
    for label, path in {
        "exists": roots["secret"] / "passwords.csv",
        "missing": roots["secret"] / "nothing.csv",
        "dotdot": roots["data"] / ".." / "secret" / "passwords.csv",
        "symlink": roots["data"] / "sneaky.jsonl",
    }.items():
        refused = api.post("/v1/jobs", json=spec("p", tiny_base, path), headers=auth(ADMIN))
        assert refused.status_code == 422
        problems = {p["field"]: p["message"] for p in refused.json()["detail"]["problems"]}
        answers[label] = problems["adapters.0.data.path"]
        assert "hunter2" not in refused.text
    assert len(set(answers.values())) == 1 and "data roots" in answers["exists"]
    # the base model: a directory outside the model roots, a hub id outside the allow-list
    outside = api.post("/v1/jobs", json=spec("p", tmp_path, roots["data"] / "a.jsonl"), headers=auth(ADMIN))
    assert "model roots" in json.dumps(outside.json())
    hub = spec("p", tiny_base, roots["data"] / "a.jsonl") | {"base_model": "evil/model"}
    assert "allows" in json.dumps(api.post("/v1/jobs", json=hub, headers=auth(ADMIN)).json())
    allowed = spec("p", tiny_base, roots["data"] / "a.jsonl") | {"base_model": "Qwen/Qwen2.5-0.5B"}
    assert api.post("/v1/jobs", json=allowed, headers=auth(ADMIN)).status_code == 201


def test_bad_requests_are_4xx_never_500(api: TestClient, tiny_base: Path, roots: dict[str, Path]) -> None:
    data = roots["data"] / "a.jsonl"
    # malformed JSON without a token: 401 before the body is read
    assert (
        api.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        == 401
    )
    # a NUL in an id or a name (PostgreSQL refuses it in a query: once a 400 "database error")
    for path in ("/v1/jobs/%00", "/v1/adapters/p/%00", "/v1/adapters/p/a%00b/lineage"):
        answer = api.get(path, headers=auth(ADMIN))
        assert answer.status_code == 404 and "NUL" in answer.json()["detail"]["message"], (path, answer.text)
    # huge numbers
    assert api.get("/v1/jobs/x/events", params={"after": 10**20}, headers=auth(ADMIN)).status_code in (
        404,
        422,
    )
    big = spec("p", tiny_base, data)
    big["adapters"][0]["priority"] = 10**30
    assert api.post("/v1/jobs", json=big, headers=auth(ADMIN)).status_code == 422
    # oversized bodies and names
    huge = api.post(
        "/v1/jobs", content=b"x" * (2 << 20), headers=auth(ADMIN) | {"Content-Type": "application/json"}
    )
    assert huge.status_code == 413
    long_name = spec("p", tiny_base, data, name="a" * 5000)
    refused = api.post("/v1/jobs", json=long_name, headers=auth(ADMIN))
    assert refused.status_code == 422 and len(refused.text) < 2000  # the name is not echoed whole
    newline = spec("p", tiny_base, data, adapter="bad\n")
    assert api.post("/v1/jobs", json=newline, headers=auth(ADMIN)).status_code == 422
    # promotion aliases MLflow would refuse, checked before anything is registered
    api.post("/v1/jobs", json=spec("p", tiny_base, data), headers=auth(ADMIN))
    for alias in ("../../x", "v1", "latest", "a" * 300):
        answer = api.post("/v1/adapters/p/a/promote", json={"alias": alias}, headers=auth(ADMIN))
        assert answer.status_code in (400, 422), (alias, answer.text)


def test_a_failed_export_leaves_nothing_behind(
    api: TestClient, tiny_base: Path, roots: dict[str, Path], tmp_path: Path
) -> None:
    api.post("/v1/jobs", json=spec("p", tiny_base, roots["data"] / "a.jsonl"), headers=auth(ADMIN))
    for _ in range(3):  # the adapter has not trained: nothing to export
        assert api.get("/v1/adapters/p/a/export", headers=auth(ADMIN)).status_code == 400
    exports = tmp_path / "home" / "artifacts" / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []


@pytest.fixture
def shared_api(db_url: str, tmp_path: Path, roots: dict[str, Path]):
    """The API on SQLite and on PostgreSQL, as a team's server runs it (data and model roots set)."""
    settings = Settings(
        home=tmp_path / "home",
        db_url=db_url,
        api_token=ADMIN,
        data_roots=str(roots["data"]),
        model_roots=str(roots["models"]),
        allowed_models="Qwen/*",
    )
    settings.home.mkdir()
    with TestClient(create_app(settings, start_controller=False)) as client:
        yield client


def _parent_problems(
    api: TestClient, token: str, parent: str, data: Path, base: str = "Qwen/Qwen2.5-0.5B", **extra: object
) -> list:
    """Bob's spec starting from `parent`; by default on another base than alice's, and another rank
    and target modules, so a compatibility check would tell alice's (the base's path among them)."""
    stolen = {
        "name": "steal",
        "project": "bob",
        "base_model": base,
        "train": {"steps": 0},
        "adapters": [{"name": "stolen", "parent": parent, "data": {"path": str(data)}}],
        **extra,
    }
    answer = api.post("/v1/jobs", json=stolen, headers=auth(token))
    assert answer.status_code == 422, answer.text
    return answer.json()["detail"]["problems"]


def test_a_parent_in_a_project_the_token_cannot_read_is_missing(
    shared_api: TestClient, tiny_base: Path, roots: dict[str, Path]
) -> None:
    """Bob's token naming `parent: alice/secret` once got a 201, and the export of the child was alice's
    weights bit for bit; the refusals around it told alice's rank, target modules and base model path.
    Now another project's adapter is, to a project token, exactly a name that does not exist."""
    api, data = shared_api, roots["data"] / "a.jsonl"
    alice, bob = token(api, "alice"), token(api, "bob")
    secret = spec("alice", tiny_base, data, adapter="secret")
    secret["lora"] = {"r": 4, "target_modules": ["k_proj"]}
    assert api.post("/v1/jobs", json=secret, headers=auth(alice)).status_code == 201

    def same_as_missing(problems: list, parent: str) -> None:
        missing_parent = parent.replace("secret", "nothing")
        missing = _parent_problems(api, bob, missing_parent, data)
        assert problems == [{**p, "message": p["message"].replace("nothing", "secret")} for p in missing]
        for leak in ("k_proj", "rank", str(tiny_base), "base_model"):
            assert leak not in json.dumps(problems)

    same_as_missing(_parent_problems(api, bob, "alice/secret", data), "alice/secret")
    # the attack as it was: a compatible spec, zero steps, and the export of bob/stolen was alice's weights
    compatible = _parent_problems(api, bob, "alice/secret", data, base=str(tiny_base), lora=secret["lora"])
    assert [p["message"] for p in compatible] == [
        "no adapter 'alice/secret' in this job or in project 'alice'; train the parent first or fix the name"
    ]
    # a spec that also fails validation still says the parent is missing, as for an unknown name
    invalid = _parent_problems(api, bob, "alice/secret", data, typo=1)
    assert {"field": "adapters.0.parent", "message": invalid[-1]["message"]} in invalid
    assert invalid[-1]["message"].startswith("no adapter 'alice/secret'")
    assert api.get("/v1/jobs", headers=auth(bob)).json() == []  # nothing stored
    # every route that names an adapter: the same 404 as an adapter that does not exist
    for route, method, body in (
        ("", "GET", None),
        ("/lineage", "GET", None),
        ("/export", "GET", None),
        ("/generate", "POST", {"prompt": "x"}),
        ("/promote", "POST", {}),
        ("/branch", "POST", {"name": "child", "data": {"path": str(data)}}),
    ):
        hidden = api.request(method, f"/v1/adapters/alice/secret{route}", headers=auth(bob), json=body)
        unknown = api.request(method, f"/v1/adapters/bob/nothing{route}", headers=auth(bob), json=body)
        assert hidden.status_code == unknown.status_code == 404, (route, hidden.text, unknown.text)
        assert hidden.json()["detail"]["message"] == "adapter alice/secret not found"
    assert api.get("/v1/jobs", headers=auth(bob)).json() == []

    # the admin may still branch across projects (documented); bob's token sees only bob's part of it
    across = spec("bob", tiny_base, data, name="across", adapter="child")
    across["lora"] = secret["lora"]
    across["adapters"][0]["parent"] = "alice/secret"
    assert api.post("/v1/jobs", json=across, headers=auth(ADMIN)).status_code == 201
    tree = api.get("/v1/adapters/bob/child/lineage", headers=auth(bob)).json()
    assert (tree["name"], tree["parent"], tree["children"]) == ("bob/child", None, [])
    assert "alice" not in json.dumps(tree)


def test_a_lineage_tree_across_projects_keeps_the_target_and_hides_the_rest() -> None:
    """alice/a -> bob/b -> alice/c -> bob/d: bob asking for bob/d once got bob/b with its child alice/c
    pruned, and bob/d gone with it."""
    from orchestrator.server.routes.lineage import visible_tree
    from orchestrator.service.auth import Principal
    from orchestrator.spec.views import LineageNode

    def node(name: str, parent: str | None, *children: LineageNode) -> LineageNode:
        return LineageNode(name=name, parent=parent, status="evaluated", metrics={}, children=list(children))

    d = node("bob/d", "alice/c", node("bob/e", "bob/d"), node("alice/f", "bob/d"))
    tree = node("alice/a", None, node("bob/b", "alice/a", node("alice/c", "bob/b", d)))
    bob = Principal("reader", "bob")
    shown = visible_tree(tree, bob, "bob/d")
    assert (shown.name, shown.parent, [c.name for c in shown.children]) == ("bob/d", None, ["bob/e"])
    upper = visible_tree(tree, bob, "bob/b")
    assert (upper.name, upper.parent, upper.children) == ("bob/b", None, [])
    assert visible_tree(tree, Principal("admin"), "bob/d") == tree


def test_export_onto_full_or_read_only_storage_answers_507_or_503_as_json(
    tmp_path: Path, tiny_base: Path, roots: dict[str, Path], small_storage: Path
) -> None:
    """Storage full, then remounted read-only: the export fails, as it must, but with JSON that says
    the cause first (before: a plain-text 500), and leaves nothing behind."""
    settings = Settings(
        home=tmp_path / "home",
        storage=str(small_storage),
        data_roots=str(roots["data"]),
        model_roots=str(roots["models"]),
        api_token=ADMIN,
    )
    settings.home.mkdir()
    with TestClient(create_app(settings, start_controller=False)) as api:
        job = api.post("/v1/jobs", json=spec("p", tiny_base, roots["data"] / "a.jsonl"), headers=auth(ADMIN))
        assert job.status_code == 201, job.text
        checkpoint = tmp_path / "final"  # off the small volume: a finished adapter of 1 MiB
        checkpoint.mkdir()
        (checkpoint / "adapter_config.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(os.urandom(2**20))
        (checkpoint / "lorafleet.json").write_text("{}")
        store = api.app.state.plane.store
        adapter = store.get_adapter("p", "a")
        store.update_adapter(AdapterChange(adapter.id, state="training"))
        store.update_adapter(AdapterChange(adapter.id, state="trained", final_checkpoint=str(checkpoint)))

        full = api.get("/v1/adapters/p/a/export", headers=auth(ADMIN))
        assert full.status_code == 507 and full.headers["content-type"] == "application/json"
        message = full.json()["detail"]["message"]
        assert message.startswith("storage is full (ENOSPC") and "\n" not in message
        assert list((small_storage / "exports").iterdir()) == []  # nothing half-written stays

        subprocess.run(["mount", "-o", "remount,ro", str(small_storage)], check=True)
        read_only = api.get("/v1/adapters/p/a/export", headers=auth(ADMIN))
        assert read_only.status_code == 503, read_only.text
        assert read_only.json()["detail"]["message"].startswith("storage is read-only (EROFS)")


def test_the_cli_says_a_full_or_read_only_disk_first_in_one_line(
    small_storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the CLI printed a traceback whose last line held the cause (`EROFS`, `ENOSPC`)."""
    import typer

    from orchestrator.cli.commands import _run

    with pytest.raises(typer.Exit) as full:
        _run(lambda: (small_storage / "big").write_bytes(b"x" * 2**20))
    assert full.value.exit_code == 3
    said = capsys.readouterr().err
    assert said.startswith("error: storage is full (ENOSPC") and "Traceback" not in said
    subprocess.run(["mount", "-o", "remount,ro", str(small_storage)], check=True)
    with pytest.raises(typer.Exit):
        _run(lambda: (small_storage / "out").mkdir())
    assert capsys.readouterr().err.startswith("error: storage is read-only (EROFS)")


def test_retry_requeues_a_failed_jobs_failed_adapters_once(
    api: TestClient, tiny_base: Path, roots: dict[str, Path]
) -> None:
    """Before, a failed adapter stayed failed: there was no way to train it again once storage was fixed."""
    job = api.post(
        "/v1/jobs", json=spec("p", tiny_base, roots["data"] / "a.jsonl"), headers=auth(ADMIN)
    ).json()
    store = api.app.state.plane.store
    adapter = store.get_adapter("p", "a")
    store.update_adapter(AdapterChange(adapter.id, state="failed", error="storage is full (ENOSPC)"))
    store.set_job_state(job["id"], "failed", error="a: storage is full (ENOSPC)")
    member = token(api, "p")
    retried = api.post(f"/v1/jobs/{job['id']}/retry", headers=auth(member))
    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "running" and not retried.json()["error"]
    again = store.get_adapter("p", "a")
    assert again.state == "queued" and again.error is None
    twice = api.post(f"/v1/jobs/{job['id']}/retry", headers=auth(member))
    assert twice.status_code == 409 and "no failed adapters" in twice.json()["detail"]["message"]
    other = token(api, "q")
    assert api.post(f"/v1/jobs/{job['id']}/retry", headers=auth(other)).status_code == 404


def test_a_project_token_may_not_run_its_own_scorer_code_the_admin_may(
    api: TestClient, tiny_base: Path, roots: dict[str, Path]
) -> None:
    """A `module:function` scorer runs the submitter's code in the workers: on a shared server (unset
    LORAFLEET_ALLOW_USER_SCORERS) a project token is refused with the field and the fix, the admin not."""
    body = spec("alice", tiny_base, roots["data"] / "a.jsonl")
    body["adapters"][0]["eval"] = {"scorers": ["exact_match", "evil.module:run"]}
    refused = api.post("/v1/jobs", json=body, headers=auth(token(api, "alice")))
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["detail"]["problems"]
    assert problem["field"] == "adapters.0.eval.scorers"
    assert "'evil.module:run'" in problem["message"] and "LORAFLEET_ALLOW_USER_SCORERS" in problem["message"]
    assert "built-in scorers (exact_match" in problem["message"]
    assert api.post("/v1/jobs", json=body, headers=auth(ADMIN)).status_code == 201


@pytest.mark.parametrize(
    ("setting", "admin", "member"), [(None, True, False), (True, True, True), (False, False, False)]
)
def test_user_scorers_are_allowed_as_the_setting_says(
    setting: bool | None, admin: bool, member: bool
) -> None:
    settings = Settings(allow_user_scorers=setting)
    assert settings.user_scorers_allowed(admin=True) is admin
    assert settings.user_scorers_allowed(admin=False) is member
