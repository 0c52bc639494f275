"""The session examples (`examples/sessions/`) as a person runs them: each a separate process against one
real `lorafleet server` process, on the real SmolLM2-135M-Instruct base, with a project token.

Each example prints its measurements as a last line `RESULT {json}`; the tests read that and check
what the example claims, at the smallest settings that still show it: the SFT loop's held-out loss drops,
the RL loop's held-out mean reward rises by a clear margin (a fixed seed: sampling, data order and LoRA
init are all seeded, so the run repeats), and two clients training at once both train and each equals
its run alone. The examples' pure parts (reward, advantages, datums) are checked without a server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RealBase
from tests.orchestrator.test_load import TOKEN, served

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sessions"
sys.path.insert(0, str(EXAMPLES))  # the examples import `common` as a script's sibling

import common  # noqa: E402
import rl_loop  # noqa: E402

PROJECT = "cookbook"
RUN_TIMEOUT_S = 900  # a hang fails instead of blocking the suite; no assertion is about time
RL_MARGIN = 0.3  # the held-out mean reward must rise at least this much (seed 0 starts at 0.22)


@dataclass(frozen=True)
class Server:
    url: str
    token: str  # a member token of PROJECT, as `lorafleet token create --project` gives one
    home: Path


@pytest.fixture(scope="module")
def server(real_base: RealBase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cookbook") / "home"
    home.mkdir()
    (home / "bases").symlink_to(real_base.home / "bases")  # as if `lorafleet models pull` ran in this home
    with served(home, f"sqlite:///{home / 'lorafleet.db'}") as url:
        made = httpx.post(
            f"{url}/v1/tokens",
            json={"project": PROJECT},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert made.status_code == 201, made.text
        yield Server(url, made.json()["token"], home)


def run_example(server: Server, script: str, *args: str) -> dict[str, Any]:
    """`python examples/sessions/<script> --url ... --token ...` in its own process; its RESULT."""
    env = {**os.environ, "LORAFLEET_HOME": str(server.home)}  # where the base's tokenizer is pulled
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / script),
            "--url",
            server.url,
            "--token",
            server.token,
            "--project",
            PROJECT,
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), done.stdout[-3000:]
    return json.loads(last.removeprefix("RESULT "))


def test_sft_loop_lowers_the_held_out_loss(server: Server) -> None:
    result = run_example(server, "sft_loop.py", "--steps", "3", "--batch", "4", "--eval", "4")
    assert len(result["train_loss"]) == 3
    assert result["held_out_loss_after"] < 0.5 * result["held_out_loss_before"], result


def test_rl_loop_raises_the_held_out_mean_reward(server: Server) -> None:
    result = run_example(server, "rl_loop.py", "--steps", "2", "--seed", "0")
    before, after = result["before"]["mean_reward"], result["after"]["mean_reward"]
    assert after - before >= RL_MARGIN, result
    assert result["loss"] == "importance_sampling"


def test_two_clients_at_once_both_train_and_each_equals_its_run_alone(server: Server) -> None:
    result = run_example(server, "two_clients.py", "--steps", "2", "--batch", "2")
    assert result["trained"] and result["same"], result
    for skill in ("dates", "route"):
        together, alone = result["together"][skill], result["alone"][skill]
        assert together["steps"] == alone["steps"] == 2
        assert together["probe_logprob_after"] > together["probe_logprob_before"]
        assert together["probe_logprob_after"] == pytest.approx(alone["probe_logprob_after"], abs=1e-4)
        assert together["losses"] == pytest.approx(alone["losses"], abs=1e-4)


def test_an_example_without_the_base_here_says_how_to_get_its_tokenizer(
    server: Server, tmp_path: Path
) -> None:
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "empty-home")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "sft_loop.py"), "--url", server.url, "--token", server.token],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "lorafleet models pull smollm2-135m-instruct" in done.stderr and "--tokenizer" in done.stderr


def test_a_session_call_may_wait_longer_than_the_clients_request_timeout(server: Server) -> None:
    """A queued-ahead loop's last call is answered after every cycle before it: the client must not give
    up on it at its usual request timeout (here cut to 0.05 s, less than any call of a 135M model takes)."""
    from orchestrator.client.client import Client
    from workers.contract.sessions import SamplingParams

    with Client(server.url, server.token, project=PROJECT) as client:
        tc = client.create_lora_training_client(common.DEFAULT_BASE, rank=4, seed=0)
        client._http.timeout = httpx.Timeout(0.05)
        try:
            out = tc.sample([1, 2, 3], 2, SamplingParams(max_tokens=8, stop=[], seed=0)).result()
        finally:
            client._http.timeout = httpx.Timeout(60.0)
            tc.close()
    assert [len(s.tokens) for s in out.sequences] == [8, 8]


# ---- the examples' pure parts ----


def test_the_reward_pays_for_a_bare_yes_or_no_that_ends_its_turn() -> None:
    assert rl_loop.reward("Yes.", stopped=True) == rl_loop.reward(" no", stopped=True) == 1.0
    assert rl_loop.reward("Yes", stopped=False) == 0.5  # cut at max_tokens: it may have gone on
    assert rl_loop.reward("No, a bus is a vehicle.", stopped=True) == 0.5
    assert rl_loop.reward("Nope", stopped=True) == rl_loop.reward("Although yes", stopped=True) == 0.0


def test_group_advantages_are_centred_and_zero_when_the_group_agrees() -> None:
    assert rl_loop.group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert rl_loop.group_advantages([1.0, 0.0]) == [1.0, -1.0]
    advantages = rl_loop.group_advantages([1.0, 0.5, 0.0, 0.0])
    assert sum(advantages) == pytest.approx(0.0) and advantages[0] > advantages[1] > advantages[2]


def test_held_out_questions_ask_about_items_never_trained_on() -> None:
    train, held_out = rl_loop.questions("train"), rl_loop.questions("eval")

    def item(question: str) -> str:
        return question.split()[2]

    assert held_out and not {item(q) for q, _ in held_out} & {item(q) for q, _ in train}
    assert {a for _, a in train} == {"yes", "no"}


def test_an_rl_datum_puts_the_sampler_logprobs_and_advantage_on_the_answer_only() -> None:
    from workers.contract.sessions import SampledSequence

    sample = SampledSequence(tokens=[7, 8, 2], logprobs=[-0.5, -0.25, -0.125], stop_reason="stop")
    datum = rl_loop.rl_datum([1, 2, 3], sample, 0.75)
    inputs = datum.loss_fn_inputs
    assert datum.model_input == [1, 2, 3, 7, 8] and inputs.target_tokens == [2, 3, 7, 8, 2]
    assert inputs.logprobs == [0.0, 0.0, -0.5, -0.25, -0.125]
    assert inputs.advantages == [0.0, 0.0, 0.75, 0.75, 0.75]


def test_a_chat_datum_weights_the_answer_and_its_end_of_turn(real_base: RealBase) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base.path)
    datum, n = common.chat_datum(tokenizer, "ISO date of 5 March 2021?", "2021-03-05")
    weights = datum.loss_fn_inputs.weights or []
    weighted = [t for t, w in zip(datum.loss_fn_inputs.target_tokens, weights, strict=True) if w]
    assert n == len(weighted) and tokenizer.decode(weighted) == "2021-03-05<|im_end|>"
    prompt = common.chat_prompt(tokenizer, "ISO date of 5 March 2021?")
    assert datum.model_input[: len(prompt)] == prompt
    (mean,) = common.mean_weighted([(datum, n)])
    assert sum(mean.loss_fn_inputs.weights or []) == pytest.approx(1.0)
