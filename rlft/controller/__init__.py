"""Controllers: one readable function per algorithm, phases named and timed."""

# The controller of each algorithm: module, function.
CONTROLLERS = {
    "sft": ("rlft.controller.sft", "sft"),
    "grpo": ("rlft.controller.grpo", "grpo"),
    "ppo": ("rlft.controller.ppo", "ppo"),
    "dpo": ("rlft.controller.dpo", "dpo"),
    "online_dpo": ("rlft.controller.online_dpo", "online_dpo"),
}


def run_job(cfg):
    """Run the job ``cfg`` describes with its algorithm's controller; returns the ``RunResult``.

    When the job starts a local Ray cluster of its own, the controller's modules (torch, transformers: seconds)
    load in a thread while this one starts it. What needs those libraries here (the embedded model built on first
    use, the LoRA target check) comes before. A job that joins a cluster loads them first: connecting to a cluster
    can set up the job's runtime environment, working directory included, under the feet of an import."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    from rlft import startup
    from rlft.config import ConfigError
    from rlft.controller.common import resolve_paths
    from rlft.controller.run import check_model, open_run
    from rlft.distributed.cluster import cluster_address

    if cfg.algorithm not in CONTROLLERS:
        raise ConfigError(f"algorithm: {cfg.algorithm!r} has no controller yet")
    module, name = CONTROLLERS[cfg.algorithm]
    resolved = resolve_paths(cfg)
    check_model(resolved)
    if cluster_address(cfg.ray):
        controller = getattr(importlib.import_module(module), name)
        # transformers resolves a relative path as it loads, and the RL controllers import it only when they load
        # the tokenizer, after connecting: it loads here, while the working directory is still this process's own.
        import transformers  # noqa: F401
        startup.mark("driver", "imports")
        open_run(resolved)
        return controller(cfg)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlft-import") as pool:
        imported = pool.submit(importlib.import_module, module)
        open_run(resolved)
        controller = getattr(imported.result(), name)
    startup.mark("driver", "imports")
    return controller(cfg)
