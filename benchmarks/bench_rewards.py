"""Reward throughput: 2,048 responses of ~4k tokens through the reward process pool.

Prints samples/s of the pool (the released multimodal reward: accuracy via math-verify,
self-critique, image revisit, repetition, plus format and efficient-length), the same work on one
process as the baseline measured in this run, per-term cost, and the share of reward time spent
inside math-verify. Responses are synthetic but shaped like real ones: <think> reasoning in
paragraphs with self-reflection, image references and some repetition, then a boxed answer.

CPU (what this was written for):  python benchmarks/bench_rewards.py            # well under a minute on 2 cores
Smaller:                          python benchmarks/bench_rewards.py --samples 256
"""

from __future__ import annotations

import argparse
import os
import random
import time

from megatron_revisual.rl import rewards as R
from megatron_revisual.rl.reward_pool import RewardPool
from megatron_revisual.rl.rewards import RewardConfig, RewardSample, compute_reward

SENTENCES = [
    "Let the side length of the square be {a}, so its area is {a}^2 = {b}.",
    "The image shows a triangle with one angle of {a} degrees.",
    "From the diagram, the two lines meet at the point ({a}, {b}).",
    "We substitute x = {a} into the equation and obtain y = {b}.",
    "Wait, that does not look right, let me check the sign of the second term.",
    "But the image shows that the segment is longer than {a}.",
    "Looking at the image again, I see that the angle is actually {b} degrees.",
    "Hmm, maybe I made a mistake in the previous step.",
    "So the total is {a} + {b} = {c}.",
    "Alternatively, we can compute the ratio as \\frac{{{a}}}{{{b}}}.",
    "I think the factorisation (x - {a})(x + {b}) is correct.",
    "Therefore the perimeter equals 2({a} + {b}) = {d}.",
    "Let me re-evaluate the expression \\sqrt{{{a}}} \\cdot \\sqrt{{{b}}}.",
    "Perhaps there is a simpler way to see this.",
]
ANSWERS = [("\\frac{1}{2}", "0.5"), ("0.75", "\\frac{3}{4}"), ("12", "12"), ("2\\sqrt{2}", "\\sqrt{8}"),
           ("3\\pi", "3\\pi"), ("(1, 2)", "(1,2)"), ("B", "B"), ("x = 5", "5")]  # fmt: skip


def make_samples(n: int, target_tokens: int, seed: int = 0) -> list[RewardSample]:
    """Responses of about ``target_tokens`` tokens (~4 characters per token)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        paragraphs, chars = [], 0
        while chars < 4 * target_tokens:
            para = " ".join(
                rng.choice(SENTENCES).format(
                    a=rng.randint(1, 99),
                    b=rng.randint(1, 99),
                    c=rng.randint(1, 199),
                    d=rng.randint(1, 400),
                )
                for _ in range(rng.randint(3, 8))
            )
            paragraphs.append(para)
            chars += len(para) + 2
        answer, truth = ANSWERS[i % len(ANSWERS)]
        if i % 2:  # half of them wrong
            truth = str(rng.randint(100, 999))
        text = (
            "<think>\n"
            + "\n\n".join(paragraphs)
            + "\n</think>\n\nThe answer is $\\boxed{"
            + answer
            + "}$."
        )
        out.append(RewardSample(response=text, ground_truth=truth, response_length=len(text) // 4))
    return out


def profile_terms(samples: list[RewardSample], config: RewardConfig) -> dict[str, float]:
    """Seconds per term over ``samples`` on this process; accuracy split into extraction and
    math-verify (parse + verify)."""
    t: dict[str, float] = {name: 0.0 for name in config.weights}
    t["accuracy:extract"] = t["accuracy:math_verify"] = 0.0
    for s in samples:
        for name in config.weights:
            if name == "accuracy":
                t0 = time.perf_counter()
                answer = R.extract_answer(s.response)
                t1 = time.perf_counter()
                if answer is not None:
                    R.answers_match(answer, s.ground_truth)
                t2 = time.perf_counter()
                t["accuracy:extract"] += t1 - t0
                t["accuracy:math_verify"] += t2 - t1
                t["accuracy"] += t2 - t0
            else:
                t0 = time.perf_counter()
                R.REWARD_TERMS[name](s, config)
                t[name] += time.perf_counter() - t0
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--profile-samples", type=int, default=256, help="single-process baseline size"
    )
    args = parser.parse_args()

    weights = dict(R.REWARD_PRESETS["revisual_math_v1"].weights or {}) | {"format": 0.0, "efficient_length": 0.0}
    config = RewardConfig(weights=weights, length_budget=args.tokens)
    samples = make_samples(args.samples, args.tokens)
    mean_chars = sum(len(s.response) for s in samples) / len(samples)
    print(
        f"{len(samples)} responses, mean {mean_chars:,.0f} characters (~{mean_chars / 4:,.0f} tokens)"
    )
    # Other jobs on the machine take cores from the pool; the load average says how many.
    load = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    print(f"cores visible: {os.cpu_count()}, reward workers: {args.workers}, load average: {load}")

    R.warmup()
    base = samples[: args.profile_samples]
    terms = profile_terms(base, config)  # also warms sympy's caches, as the pool's warm-up does
    t0 = time.perf_counter()
    for s in base:
        compute_reward(s, config)
    single = len(base) / (time.perf_counter() - t0)
    total = sum(v for k, v in terms.items() if ":" not in k)

    with RewardPool.for_config(config, num_workers=args.workers, timeout_s=30.0) as pool:
        pool.score(samples[:4])  # wait for the workers' start-up and warm-up
        result = pool.score(samples)
    pooled = len(samples) / result.seconds

    print(f"\nsingle process (baseline, {len(base)} samples): {single:8.1f} samples/s")
    print(f"pool of {args.workers} ({len(samples)} samples, {result.seconds:.1f} s): {pooled:8.1f} samples/s  "
          f"({pooled / single:.2f}x the baseline)")  # fmt: skip
    print(
        f"failed samples: {result.num_failed} (timeouts {result.num_timeouts}, errors {result.num_errors})"
    )
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print(f"mean overall reward: {sum(result.overall) / len(samples):.4f}")
    print("\nper-term cost on one process (ms/sample, share of reward time):")
    for name, secs in sorted(terms.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {1000 * secs / len(base):8.2f} ms  {100 * secs / total:5.1f}%")
    print(
        f"\nshare of reward time in math-verify (parse + verify): {100 * terms['accuracy:math_verify'] / total:.1f}%"
    )


if __name__ == "__main__":
    main()
