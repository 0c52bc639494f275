"""Two clients training at once on one server, each exactly as it trains alone.

Two users (two `Client`s, each with its own session) train different skills from two threads at the same
time: `dates` ("ISO date of 5 March 2021?") and `route` (a customer message to a team label). Their calls
meet in the server's clock cycles: each cycle runs both sessions' forward_backward in one packed pass over
the shared base, then each session's optim_step. Then each trains again, alone, on the same batches.

Both start from one saved state (a session's initial LoRA weights depend on its id, so a fresh session
would start elsewhere): a session is created, saved at step 0 and closed, and every run starts from that
save. What shows that each was trained: the log-probability of a held-out answer rises. What shows
that sharing changed nothing: the losses and that log-probability are the same, together and alone
(float32 rounding, `--tolerance`).

    python examples/sessions/two_clients.py --url http://127.0.0.1:8000 --token $TOKEN
"""

from __future__ import annotations

import threading
import time
from typing import Any

from common import chat_datum, connect, load_tokenizer, mean_weighted, parser, report

from workers.contract.sessions import AdamParams
from workers.evaluation.skills import skill_records

SKILLS = ("dates", "route")


def exchange(record: dict[str, Any]) -> tuple[str, str]:
    user, assistant = record["messages"]  # type: ignore[misc]
    return user["content"], assistant["content"]


def probe_logprob(tc: Any, tokenizer: Any, skill: str) -> Any:
    """A future of the summed logprob of a held-out record's answer tokens (a `forward`, no step)."""
    datum, _ = chat_datum(tokenizer, *exchange(skill_records(skill, "eval", 1)[0]))
    future = tc.forward([datum], "cross_entropy")  # weights 1 on the answer: the loss is -sum logprob
    return future


def run(client: Any, start: str, tokenizer: Any, skill: str, args: Any) -> dict[str, Any]:
    """One user's loop: from the saved start, `--steps` steps of its skill; its losses and its probe's
    logprob before and after."""
    tc = client.create_training_client_from_state(start)
    try:
        before = probe_logprob(tc, tokenizer, skill)
        records = skill_records(skill, "train", args.steps * args.batch, seed=args.seed)
        adam = AdamParams(learning_rate=args.lr)
        steps = []
        for step in range(args.steps):
            batch = [
                chat_datum(tokenizer, *exchange(r))
                for r in records[step * args.batch : (step + 1) * args.batch]
            ]
            steps.append(
                (tc.forward_backward(mean_weighted(batch)), tc.optim_step(adam))
            )  # queued, not waited
        after = probe_logprob(tc, tokenizer, skill)
        return {
            "losses": [fb.result().loss for fb, _ in steps],
            "steps": steps[-1][1].result().step,
            "probe_logprob_before": -before.result().loss,
            "probe_logprob_after": -after.result().loss,
        }
    finally:
        tc.close()


def together(args: Any, start: str, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """Both users at once, each from its own thread with its own `Client`."""
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def user(skill: str) -> None:
        try:
            with connect(args) as client:
                results[skill] = run(client, start, tokenizer, skill, args)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(skill,)) for skill in SKILLS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest difference that counts as equal")
    args = p.parse_args()
    tokenizer = load_tokenizer(args)
    started = time.monotonic()
    with connect(args) as client:
        init = client.create_lora_training_client(args.base, rank=args.rank, seed=args.seed)
        start = init.save_state("two-clients-start", close=True).result()
        print(f"both start from {start}")
        shared = together(args, start, tokenizer)
        alone = {skill: run(client, start, tokenizer, skill, args) for skill in SKILLS}
    diffs = {}
    for skill in SKILLS:
        a, b = shared[skill], alone[skill]
        diffs[skill] = max(
            abs(a["probe_logprob_after"] - b["probe_logprob_after"]),
            *(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)),
        )
        print(
            f"{skill}: {a['steps']} steps together; held-out answer logprob "
            f"{a['probe_logprob_before']:.3f} -> {a['probe_logprob_after']:.3f}; "
            f"alone {b['probe_logprob_after']:.3f}; largest difference {diffs[skill]:.2e}"
        )
    same = all(d <= args.tolerance for d in diffs.values())
    trained = all(shared[s]["probe_logprob_after"] > shared[s]["probe_logprob_before"] for s in SKILLS)
    print(f"both trained: {trained}; each equals its run alone: {same}")
    report(
        {
            "together": shared,
            "alone": alone,
            "max_diff": diffs,
            "trained": trained,
            "same": same,
            "wall_s": round(time.monotonic() - started, 1),
        }
    )


if __name__ == "__main__":
    main()
