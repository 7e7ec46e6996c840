"""Prompts shared by `revisual eval` and `revisual infer`."""

# The ReVisual-R1 system prompt, verbatim from the released README and evaluation tool.
REVISUAL_SYSTEM_PROMPT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
    "final answer MUST BE put in \\boxed{}."
)
