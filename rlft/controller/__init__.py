"""Controllers: one readable function per algorithm, phases named and timed."""


def run_job(cfg):
    """Run the job ``cfg`` describes with its algorithm's controller; returns the ``RunResult``."""
    from rlft.config import ConfigError

    if cfg.algorithm == "sft":
        from rlft.controller.sft import sft as run
    elif cfg.algorithm == "grpo":
        from rlft.controller.grpo import grpo as run
    elif cfg.algorithm == "ppo":
        from rlft.controller.ppo import ppo as run
    elif cfg.algorithm == "dpo":
        from rlft.controller.dpo import dpo as run
    elif cfg.algorithm == "online_dpo":
        from rlft.controller.online_dpo import online_dpo as run
    else:
        raise ConfigError(f"algorithm: {cfg.algorithm!r} has no controller yet")
    return run(cfg)
