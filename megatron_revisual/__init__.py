"""megatron-revisual: the ReVisual-R1 recipe (cold-start SFT -> multimodal GRPO+PAD -> text GRPO)
on Megatron-Core. See README.md."""

__version__ = "0.1.0"
