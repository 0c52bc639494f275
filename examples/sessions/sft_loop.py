"""Supervised fine-tuning with a hand-written loop: chat examples in, a trained session out.

The skill is `dates` from `workers.evaluation.skills` (a written date to ISO 8601: "ISO date of 5 March
2021?" -> "2021-03-05"), which SmolLM2-135M-Instruct cannot do and a few steps teach. Each example is
rendered with the base's chat template; the answer's tokens (and the end of turn) carry weight 1 / (the
batch's answer tokens), the prompt 0, so a call's summed loss is the mean per answer token. The held-out
loss (a `forward` of records never trained on: unseen dates) and one greedy answer are shown before and
after.

    python examples/sessions/sft_loop.py --url http://127.0.0.1:8000 --token $TOKEN
    python examples/sessions/sft_loop.py --steps 20 --save dates-sft   # also save_state at the end
"""

from __future__ import annotations

from typing import Any

from common import chat_datum, chat_prompt, mean_weighted, parser, report, run_session

from workers.contract.sessions import AdamParams, SamplingParams
from workers.evaluation.skills import skill_records


def exchange(record: dict[str, Any]) -> tuple[str, str]:
    user, assistant = record["messages"]  # type: ignore[misc]
    return user["content"], assistant["content"]


def held_out_loss(tc: Any, datums: list) -> float:
    """Mean loss per answer token of the held-out datums: a forward, no gradient, no step."""
    return tc.forward(mean_weighted(datums), "cross_entropy").result().loss


def answer(tc: Any, tokenizer: Any, question: str) -> str:
    params = SamplingParams(max_tokens=16, temperature=0.0)  # greedy
    out = tc.sample(chat_prompt(tokenizer, question), 1, params).result()
    return tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=True).strip()


def train(tc: Any, tokenizer: Any, args: Any) -> dict[str, Any]:
    records = skill_records("dates", "train", args.steps * args.batch, seed=args.seed)
    held_out = [chat_datum(tokenizer, *exchange(r)) for r in skill_records("dates", "eval", args.eval)]
    probe, right = exchange(skill_records("dates", "eval", 1)[0])
    before_loss, before_answer = held_out_loss(tc, held_out), answer(tc, tokenizer, probe)
    print(f"held-out loss before: {before_loss:.3f}; {probe!r} -> {before_answer!r} (right: {right!r})")
    adam = AdamParams(learning_rate=args.lr)
    losses = []
    for step in range(args.steps):
        batch = [
            chat_datum(tokenizer, *exchange(r)) for r in records[step * args.batch : (step + 1) * args.batch]
        ]
        # queue both before waiting for either: they share one clock cycle on the server
        fb = tc.forward_backward(mean_weighted(batch), "cross_entropy")
        opt = tc.optim_step(adam)
        losses.append(fb.result().loss)
        print(f"step {opt.result().step}: train loss {losses[-1]:.3f}")
    after_loss, after_answer = held_out_loss(tc, held_out), answer(tc, tokenizer, probe)
    print(f"held-out loss after: {after_loss:.3f}; {probe!r} -> {after_answer!r}")
    results: dict[str, Any] = {
        "held_out_loss_before": before_loss,
        "held_out_loss_after": after_loss,
        "answer_before": before_answer,
        "answer_after": after_answer,
        "right_answer": right,
        "train_loss": losses,
    }
    if args.save:
        results["saved"] = tc.save_state(args.save).result()
        print(f"saved: {results['saved']}")
    return results


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4, help="examples per forward_backward")
    p.add_argument("--eval", type=int, default=8, help="held-out examples")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--save", default=None, help="save_state under this name at the end")
    args = p.parse_args()
    results = run_session(args, train)
    report(results)


if __name__ == "__main__":
    main()
