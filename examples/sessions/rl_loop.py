"""RL with a verifiable reward, Tinker's way: sample several answers per prompt from the session's own
weights, score each with a pure reward function, and train on the group-normalised advantages with the
`importance_sampling` loss (`--loss ppo` for the clipped one).

The task: yes/no questions ("Is a mango a fruit? Answer yes or no."). The reward checks the answer's
form: 1 for a bare "Yes" or "No" (a period or "!" allowed) and an end of turn, 0.5 for an answer that
starts with yes or no and goes on, 0 otherwise. SmolLM2-135M-Instruct sampled at temperature 1 often
rambles ("Although the debate surrounding..."), so a few steps of RL move its held-out reward a long way;
held-out prompts ask about items never asked in training. `accuracy` (the share of bare answers that are
also right) is printed alongside: it is not rewarded.

    python examples/sessions/rl_loop.py --url http://127.0.0.1:8000 --token $TOKEN
    python examples/sessions/rl_loop.py --loss ppo --steps 8

Per step: `--prompts` training prompts x `--samples` answers (max `--max-tokens` tokens, temperature 1,
so the sampler's logprobs are the policy's), one forward_backward of every answer of a group whose rewards
differ (a group where all agree carries no signal), one optim_step queued right behind it.
"""

from __future__ import annotations

import random
import re
import statistics
from typing import Any

from common import chat_prompt, parser, report, run_session

from workers.contract.sessions import AdamParams, Datum, LossFnInputs, SampledSequence, SamplingParams

# (item, category) pairs: "Is a {item} a {category}?", half of them true
_ITEMS = {
    "an animal": ["dog", "cat", "horse", "eagle", "shark", "frog", "lion", "rabbit", "owl", "whale",
                  "goat", "bee"],
    "a fruit": ["apple", "banana", "cherry", "mango", "lemon", "grape", "peach", "pear", "plum", "kiwi",
                "melon", "fig"],
    "a vehicle": ["car", "bus", "bicycle", "train", "truck", "boat", "tram", "scooter", "taxi", "van",
                  "ship", "jeep"],
}  # fmt: skip
_BARE = re.compile(r"(yes|no)[.!]?", re.IGNORECASE)
_STARTS = re.compile(r"(yes|no)\b", re.IGNORECASE)


def questions(split: str) -> list[tuple[str, str]]:
    """(question, right answer) pairs; every 4th item of each category is held out ("eval")."""
    out = []
    categories = list(_ITEMS)
    for c, category in enumerate(categories):
        for i, item in enumerate(_ITEMS[category]):
            if (i % 4 == 3) != (split == "eval"):
                continue
            asked = category if i % 2 == 0 else categories[(c + 1) % len(categories)]  # half true, half false
            article = "an" if item[0] in "aeiou" else "a"
            right = "yes" if asked == category else "no"
            out.append((f"Is {article} {item} {asked}? Answer yes or no.", right))
    return out


def reward(answer: str, stopped: bool) -> float:
    """1: a bare yes/no that ended its turn; 0.5: starts with yes/no and goes on; 0: anything else."""
    text = answer.strip()
    if stopped and _BARE.fullmatch(text):
        return 1.0
    return 0.5 if _STARTS.match(text) else 0.0


def group_advantages(rewards: list[float]) -> list[float]:
    """Each answer's reward against its group's: (r - mean) / std; all zero when the group agrees."""
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    return [0.0 if std == 0 else (r - mean) / std for r in rewards]


def rl_datum(prompt: list[int], sample: SampledSequence, advantage: float) -> Datum:
    """The prompt and one sampled answer as a datum: the answer's tokens carry the sampler's logprobs and
    the answer's advantage, the prompt's positions zero (no loss there)."""
    tokens = prompt + sample.tokens
    n_prompt = len(prompt)
    logprobs, advantages = [], []
    for i in range(len(tokens) - 1):  # position i predicts tokens[i + 1]
        j = i + 1 - n_prompt  # index into the sampled answer, if that token is one of it
        logprobs.append(sample.logprobs[j] if j >= 0 else 0.0)
        advantages.append(advantage if j >= 0 else 0.0)
    return Datum(
        model_input=tokens[:-1],
        loss_fn_inputs=LossFnInputs(target_tokens=tokens[1:], logprobs=logprobs, advantages=advantages),
    )


def evaluate(tc: Any, tokenizer: Any, held_out: list[tuple[str, str]], args: Any) -> dict[str, float]:
    """Mean reward of `--eval-samples` answers per held-out prompt, always with the same seeds, so before
    and after differ only by the weights."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=args.seed + 10_000)
    futures = [tc.sample(chat_prompt(tokenizer, q), args.eval_samples, params) for q, _ in held_out]
    rewards, right, bare = [], 0, 0
    for (_, answer), future in zip(held_out, futures, strict=True):
        for s in future.result().sequences:
            text, stopped = tokenizer.decode(s.tokens, skip_special_tokens=True), s.stop_reason == "stop"
            r = reward(text, stopped)
            rewards.append(r)
            if r == 1.0:
                bare += 1
                right += text.strip().lower().startswith(answer)
    return {"mean_reward": statistics.fmean(rewards), "accuracy": right / bare if bare else 0.0}


def train(tc: Any, tokenizer: Any, args: Any) -> dict[str, Any]:
    train_set, held_out = questions("train"), questions("eval")
    rng = random.Random(args.seed)
    before = evaluate(tc, tokenizer, held_out, args)
    print(f"held-out mean reward before: {before['mean_reward']:.3f} (accuracy {before['accuracy']:.2f})")
    adam = AdamParams(learning_rate=args.lr)
    params = {"max_tokens": args.max_tokens, "temperature": 1.0}
    rewards_per_step = []
    for step in range(args.steps):
        batch = rng.sample(train_set, args.prompts)
        prompts = [chat_prompt(tokenizer, q) for q, _ in batch]
        # every prompt's samples queued at once: one batched generation on the server
        sampled = [
            tc.sample(p, args.samples, SamplingParams(**params, seed=args.seed * 1_000 + step * 100 + k))
            for k, p in enumerate(prompts)
        ]
        datums, rewards = [], []
        for prompt, future in zip(prompts, sampled, strict=True):
            group = future.result().sequences
            scores = [
                reward(tokenizer.decode(s.tokens, skip_special_tokens=True), s.stop_reason == "stop")
                for s in group
            ]
            rewards += scores
            datums += [
                rl_datum(prompt, s, a)
                for s, a in zip(group, group_advantages(scores), strict=True)
                if a != 0.0
            ]
        rewards_per_step.append(statistics.fmean(rewards))
        if not datums:  # every group agreed: nothing to learn from this batch
            print(f"step {step + 1}: mean reward {rewards_per_step[-1]:.3f}, no signal")
            continue
        # queued back to back: both run in the same clock cycle on the server
        fb = tc.forward_backward(datums, args.loss)
        opt = tc.optim_step(adam)
        loss, done = fb.result().loss, opt.result().step
        print(
            f"step {done}: mean reward {rewards_per_step[-1]:.3f}, "
            f"{len(datums)} answers trained, loss {loss:.3f}"
        )
    after = evaluate(tc, tokenizer, held_out, args)
    print(f"held-out mean reward after: {after['mean_reward']:.3f} (accuracy {after['accuracy']:.2f})")
    return {"before": before, "after": after, "train_reward": rewards_per_step}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="training prompts per step")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per prompt (one group)")
    p.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--loss", choices=["importance_sampling", "ppo"], default="importance_sampling")
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    results = run_session(args, train)
    results["loss"] = args.loss
    report(results)


if __name__ == "__main__":
    main()
