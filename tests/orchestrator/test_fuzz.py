"""Untrusted input, generated: the HTTP API and the spec parser must answer every input with a result or a
4xx that says what is wrong, never a 500 or a stray exception.

- schemathesis drives the real app in-process (its ASGI transport, the served OpenAPI document, the real
  admin token, a real SQLite store) operation by operation and then as stateful sequences along the
  links it infers (submit a job, then read it back...): no 5xx, and every response, 4xx included, in the
  shape the document promises.
- hypothesis feeds `JobSpec.parse` and `Service.check` arbitrary JSON-like values and mutations of a valid
  spec (a value replaced, a field dropped or added, nasty strings: `~nobody`, NUL, lone surrogates, very
  long names, huge numbers): they return a spec or raise `SpecError`, nothing else. The same mutations go
  through `POST /v1/jobs`.

No controller runs (`start_controller=False`): what is under test is the answer, not the training.

Runs are derandomized (the same examples every run, so CI never flakes on a new random find). To hunt
for more, set `LORAFLEET_FUZZ_EXAMPLES=2000`: random examples, that many per test.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance

from orchestrator.server.app import create_app
from orchestrator.service.operations import Service
from orchestrator.settings import Settings
from orchestrator.spec.job import JobSpec, SpecError, json_schema
from orchestrator.store import Store

ADMIN = "fuzz-admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CHECKS = [not_a_server_error, response_schema_conformance]

_HUNT = int(os.environ.get("LORAFLEET_FUZZ_EXAMPLES", "0"))


def _settings(examples: int) -> settings:
    """Bounded and derandomized by default; random and as many as asked when hunting."""
    return settings(
        max_examples=_HUNT or examples,
        derandomize=not _HUNT,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---- inputs ----

# Strings that once broke, or could break, path handling, SQL, JSON encoding or name checks.
NASTY = [
    "",
    ".",
    "..",
    "~",
    "~nobody-such-user/x.jsonl",
    "~/x.jsonl",
    "a\x00b",
    "/tmp/\x00.jsonl",
    "\ud800",
    "/\ud800.jsonl",
    "x" * 300,
    "/" + "y" * 5000 + ".jsonl",
    "/",
    "../../etc/passwd",
    "/etc/passwd",
    "/dev/null.jsonl",
    "a/b/c",
    "default/seed",
    "seed",
    "lorafleet-tests/no-such-model",
    "all-linear",
    "none",
    "4bit",
    "bfloat16",
    "perplexity",
    "latest",
    "v1",
    "Bad Name",
    "name\n",
    "🦙",
]


def _spec_keys() -> list[str]:
    """Every field name the job spec's JSON Schema knows, so generated mappings hit real fields."""
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json_schema())
    return sorted(keys)


KEYS = st.sampled_from(_spec_keys()) | st.text(max_size=12)


def json_like(json_safe: bool = False) -> st.SearchStrategy[Any]:
    """Values YAML or JSON could give: scalars (nasty ones often) in lists and mappings. NaN and the
    infinities only where no JSON encoding is needed (YAML spells them `.nan`, `.inf`)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 10**400])
        | st.floats(allow_nan=not json_safe, allow_infinity=not json_safe)
        | st.text(max_size=24)
        | st.sampled_from(NASTY)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
        max_leaves=24,
    )


JSON_LIKE = json_like()


def valid_spec(base: str, data: Path) -> dict[str, Any]:
    """A spec that passes every check, with every section present, for the mutations to start from."""
    return {
        "name": "fuzz-job",
        "project": "default",
        "base_model": base,
        "dtype": "float32",
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "max_seq_len": 32},
        "adapters": [
            {"name": "first", "data": {"path": str(data), "eval_fraction": 0.1}, "priority": 1},
            {
                "name": "second",
                "parent": "first",
                "data": {"path": str(data), "eval_path": str(data)},
                "lora": {"dropout": 0.1},
                "train": {"steps": 1},
            },
        ],
        "promotion": {"metric": "eval_loss", "better_than_parent": True, "alias": "champion", "auto": False},
        "resources": {"workers": 1, "cpus_per_worker": 1, "max_adapters_per_worker": 4},
    }


@st.composite
def mutated(
    draw: st.DrawFn, spec: dict[str, Any], values: st.SearchStrategy[Any] = JSON_LIKE
) -> dict[str, Any]:
    """`spec` with one to four changes somewhere in its tree: a value replaced (often by a nasty one), a
    field removed, or a field added (known or not)."""
    out = copy.deepcopy(spec)
    for _ in range(draw(st.integers(1, 4))):
        node: Any = out
        while True:  # walk down to a random container
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            break
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not keys and action != "add":
            action = "add"
        if action == "replace":
            node[key] = draw(values)
        elif action == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(KEYS)] = draw(values)
        else:
            node.append(draw(values))
    return out


# ---- fixtures ----


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-data") / "skill.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(20)))
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, data_file: Path) -> Iterator[Service]:
    """A service on a real SQLite store, holding one adapter (`default/seed`) mutations may name as parent."""
    settings = Settings(home=tmp_path_factory.mktemp("fuzz-service") / "home")
    settings.home.mkdir()
    with Store.open(settings.database_url) as store:
        svc = Service(settings, store)
        seed = valid_spec(str(tiny_base), data_file)
        seed["name"], seed["adapters"] = "seed-job", [{"name": "seed", "data": {"path": str(data_file)}}]
        svc.submit(seed)
        yield svc


@dataclass(frozen=True)
class Served:
    """The app under test, its served document, and the real ids of what exists in it."""

    app: FastAPI
    schema: schemathesis.BaseSchema
    real: dict[str, str]  # path parameter -> an id or name that exists


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, data_file: Path) -> Iterator[Served]:
    """The real app with a real admin token and SQLite store, its OpenAPI document loaded through the
    app itself, and one job (two adapters), one token and one training session (on the tiny base) in it.
    No controller: no job trains."""
    home = tmp_path_factory.mktemp("fuzz-api") / "home"
    app = create_app(Settings(home=home, api_token=ADMIN), start_controller=False)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        with asgi.get_client(app) as client:
            job = client.post("/v1/jobs", json=valid_spec(str(tiny_base), data_file), headers=AUTH)
            assert job.status_code == 201, job.text
            token = client.post("/v1/tokens", json={"project": "default", "name": "fuzz"}, headers=AUTH)
            assert token.status_code == 201, token.text
            session = client.post(
                "/v1/sessions",
                json={"base_model": str(tiny_base), "rank": 2, "targets": ["q_proj"]},
                headers=AUTH,
            )
            assert session.status_code == 201, session.text
        real = {
            "job_id": job.json()["id"],
            "project": "default",
            "name": "first",
            "token_id": token.json()["id"],
            "session_id": session.json()["id"],
        }
        yield Served(app, schema, real)
    finally:
        asgi.shutdown_lifespans()  # schemathesis keeps an app's lifespan running until asked


# ---- the HTTP API ----


def _operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is in the document
    return operations


def test_every_operation_answers_without_5xx_and_as_documented(served: Served) -> None:
    """Each operation of the served document, with data that fits it and data that does not (negative
    mode: wrong types, out-of-range numbers, missing fields), checked against the document; then once
    more with its path naming what exists (a real job, adapter, token), so the handlers behind the 404s
    run too (cancel, promote, generate, export and branch of an adapter that has not trained).

    Driven with `@given` per operation rather than schemathesis' pytest plugin (`parametrize`), which
    does not run under pytest 9 yet (it reads a `Function._nodeid` pytest no longer has)."""
    for operation in _operations(served.schema):
        names = {p.name for p in operation.path_parameters}
        real = {name: served.real[name] for name in names}
        runs = [(GenerationMode.POSITIVE, None), (GenerationMode.NEGATIVE, None)]
        if real:
            runs.append((GenerationMode.POSITIVE, real))
        for mode, path in runs:

            @_settings(25)
            @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=AUTH, checks=CHECKS)

            try:
                call()
            except Unsatisfiable:  # nothing to get wrong (GET /healthz takes no input)
                assert mode is GenerationMode.NEGATIVE, operation.label


def test_stateful_sequences_answer_without_5xx_and_as_documented(served: Served) -> None:
    """Sequences along the links schemathesis infers from the document (a job's id from a submit or a
    listing into a read, its events or a cancel; a new token's id into its revocation)."""
    base = served.schema.as_state_machine()

    class Machine(base):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": AUTH}

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=AUTH)

    Machine.run(settings=_settings(30))


def test_mutated_specs_over_http_answer_201_or_a_documented_4xx(served: Served, data_file: Path) -> None:
    """Near-valid job specs (the generic `object` body the document declares rarely gets past the
    spec's schema), with and without idempotency keys: every answer is a 201 JobView or a 4xx problem."""
    operation = served.schema["/v1/jobs"]["POST"]
    valid = valid_spec("lorafleet-tests/no-such-model", data_file)
    valid["name"] = "over-http"
    statuses: set[int] = set()

    @_settings(150)
    @given(
        body=mutated(valid, json_like(json_safe=True)) | st.just(valid),
        key=st.sampled_from([None, "k1", "k2"]),
    )
    def submit(body: dict[str, Any], key: str | None) -> None:
        headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
        response = operation.Case(body=body, headers=headers).call_and_validate(checks=CHECKS)
        statuses.add(response.status_code)

    submit()
    assert statuses <= {200, 201, 400, 403, 409, 422}, statuses
    assert 422 in statuses


def _once_crashed(data: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Specs that once escaped as RuntimeError, OSError, ValueError, TypeError or RecursionError (a 500
    over HTTP), and the field each must now be reported on."""

    def spec(**fields: Any) -> dict[str, Any]:
        return {
            "name": "j",
            "base_model": "org/model",
            "adapters": [{"name": "a", "data": {"path": str(data)}}],
        } | fields

    def adapter(**fields: Any) -> dict[str, Any]:
        return spec(adapters=[{"name": "a", "data": {"path": str(data)}} | fields])

    deep: list[Any] = []
    for _ in range(3000):
        deep = [deep]
    return {
        "unknown ~user in a data path": (
            adapter(data={"path": "~nobody-such-user/x.jsonl"}),
            "adapters.0.data.path",
        ),
        "unknown ~user in base_model": (spec(base_model="~nobody-such-user/model"), "base_model"),
        "unknown ~user in tokenizer": (spec(tokenizer="~nobody-such-user/tok"), "tokenizer"),
        "base_model name too long": (spec(base_model="/" + "x" * 300), "base_model"),
        "data path too long": (adapter(data={"path": "/" + "y" * 5000 + ".jsonl"}), "adapters.0.data.path"),
        "NUL in a data path": (adapter(data={"path": "a\x00.jsonl"}), "adapters.0.data.path"),
        "NUL in an eval path": (
            adapter(data={"path": str(data), "eval_path": "\x00"}),
            "adapters.0.data.eval_path",
        ),
        "a list as an adapter name, beside a parent": (
            spec(adapters=[{"name": [1], "data": {"path": str(data)}}, {"name": "b", "parent": "zz"}]),
            "adapters.0.name",
        ),
        "a lone surrogate as a parent": (adapter(parent="\ud800"), "adapters.0.parent"),
        "a 10 KB parent": (adapter(parent="p" * 10_000), "adapters.0.parent"),
        "a list nested 3000 deep": (spec(name=deep), "name"),
        "a 5000-digit number": (spec(name=10**5000), "name"),
    }


def test_inputs_that_once_crashed_are_spec_problems(
    service: Service, served: Served, data_file: Path
) -> None:
    """Found by the tests above. Each is a `SpecError` naming the field; over HTTP a 422 saying the same
    (or, for what JSON cannot carry or FastAPI will not parse, a 400 in the same documented shape)."""
    with asgi.get_client(served.app) as client:
        for what, (raw, field) in _once_crashed(data_file).items():
            with pytest.raises(SpecError) as caught:
                service.check(raw)
            assert field in dict(caught.value.problems), (what, caught.value.problems)
            try:
                body = json.dumps(raw)
            except (ValueError, RecursionError):  # JSON cannot carry it: the parse-error path below
                body = "[" * 100_000
            answer = client.post("/v1/jobs", data=body, headers={**AUTH, "Content-Type": "application/json"})
            assert answer.status_code in (400, 422), (what, answer.status_code, answer.text[:300])
            detail = answer.json()["detail"]
            assert isinstance(detail["message"], str) and isinstance(detail["problems"], list), what
            if answer.status_code == 422:
                assert field in {p["field"] for p in detail["problems"]}, (what, detail)


# ---- the spec parser and the submit-time checks ----


@_settings(300)
@given(raw=JSON_LIKE | st.dictionaries(KEYS, JSON_LIKE, max_size=8))
def test_parse_of_anything_returns_a_spec_or_raises_spec_error(raw: Any) -> None:
    try:
        assert isinstance(JobSpec.parse(raw), JobSpec)
    except SpecError as exc:
        assert exc.problems and all(isinstance(f, str) and isinstance(m, str) for f, m in exc.problems)


YAML_EDGES = ["a: 2001-13-45\n", "a: 2001-02-30\n", "a: " + "9" * 5000 + "\n", "[" * 5000, "? [a]\n: 1\n"]


@_settings(200)
@given(text=st.text(max_size=200) | st.sampled_from(NASTY + YAML_EDGES) | JSON_LIKE.map(yaml.safe_dump))
def test_parse_of_any_text_returns_a_spec_or_raises_spec_error(text: str) -> None:
    """Text is YAML (or, on one line ending in .yaml, a file name)."""
    try:
        assert isinstance(JobSpec.parse(text), JobSpec)
    except SpecError as exc:
        assert exc.problems


def test_parse_of_yaml_edge_cases_raises_spec_error() -> None:
    """YAML PyYAML cannot turn into values (a date like 2001-13-45, a 5000-digit number, nesting deeper
    than the stack) once escaped `JobSpec.parse` as ValueError or RecursionError: a 500 over HTTP."""
    for text in YAML_EDGES:
        with pytest.raises(SpecError):
            JobSpec.parse(text)


def test_mutations_of_a_valid_spec_parse_or_raise_spec_error(tiny_base: Path, data_file: Path) -> None:
    valid = valid_spec(str(tiny_base), data_file)
    assert isinstance(JobSpec.parse(valid), JobSpec)

    @_settings(300)
    @given(raw=mutated(valid))
    def parse(raw: dict[str, Any]) -> None:
        try:
            JobSpec.parse(raw)
        except SpecError as exc:
            assert exc.problems

    parse()


def test_service_check_of_mutations_returns_or_raises_spec_error(
    service: Service, tiny_base: Path, data_file: Path
) -> None:
    """The checks that touch the outside world (files, the base model's config, parents in SQL) too."""
    jobs_before = len(service.store.list_jobs())
    for base in (str(tiny_base), "lorafleet-tests/no-such-model"):
        valid = valid_spec(base, data_file)
        service.check(valid)

        @_settings(250)
        @given(raw=mutated(valid) | st.dictionaries(KEYS, JSON_LIKE, max_size=8))
        def check(raw: dict[str, Any]) -> None:
            try:
                service.check(raw)
            except SpecError as exc:
                assert exc.problems

        check()
    assert len(service.store.list_jobs()) == jobs_before  # checking writes nothing
