"""rlft: fine-tune language models with SFT, reinforcement learning with graders, and preference optimisation."""

__version__ = "0.1.0"
