"""GRPO + PAD algorithm core and the ReVisual-R1 rewards.

advantages    GRPO group-normalised advantages (and Dr. GRPO)
pad           Prioritized Advantage Distillation, paper and released-code variants
losses        PPO and GSPO policy losses, KL estimators, loss aggregation, entropy-bonus schedule
rollout_correction  token TIS and sequence-level reject / mask against the engine's log-probs
logprobs      log-probs and entropy from vocab-parallel (TP-sharded) logits
rewards       rule-based reward terms, the released reward presets and the graders
reward_terms  the released code's self-critique, image-revisit and repetition heuristics
reward_pool   process pool with per-sample timeouts for scoring rewards

Nothing is imported here: reward workers import `rewards` without pulling in torch.
"""
