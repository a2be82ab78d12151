"""``rlft submit``: run a job on a Ray cluster through the Ray Jobs API, and ``rlft scale`` through it as well.

    rlft submit configs/grpo_tiny.yaml trainer.max_steps=100 --address http://127.0.0.1:8265 --follow

The config is loaded and checked here first (a bad field fails before anything is sent). The job carries:

- the resolved config (``config.yaml``, the job's working directory): relative paths that exist here become
  absolute, ``logging.output_dir`` and ``checkpoint.dir`` too, and an ``openai`` grader's ``spec_file`` is inlined.
  The cluster's nodes must see those paths (shared storage), or the paths must be ``tiny://``.
- this ``rlft`` package (``py_modules``), so the driver and every actor run the code that was submitted; the
  cluster's Python environment provides the dependencies (torch, vLLM, DeepSpeed, ...).
- ``RLFT_JOB_ID`` (the submission id, which ``rlft scale`` names), the variables a run reads (WANDB_*, HF_*,
  each ``openai`` grader's ``api_key_env``) when set here, and ``--env KEY=VALUE``.

Ray's token authentication needs nothing from rlft: with ``RAY_AUTH_MODE=token`` and the token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) in this environment, the Jobs client sends it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import rlft
from rlft.config import Config, ConfigError, load_config, to_yaml

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
FORWARDED_ENV = (
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL",
    "HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT",
)


def _absolute(path: str, must_exist: bool) -> str:
    if not path or "://" in path or os.path.isabs(path):
        return path
    if must_exist and not os.path.exists(path):
        return path
    return str(Path(path).resolve())


def portable_config(cfg: Config) -> Config:
    """``cfg`` with local relative paths made absolute and grader spec files inlined (see the module doc)."""
    model = dataclasses.replace(
        cfg.model,
        path=_absolute(cfg.model.path, True),
        tokenizer_path=_absolute(cfg.model.tokenizer_path, True),
    )
    data = dataclasses.replace(cfg.data, train_path=_absolute(cfg.data.train_path, True))
    evaluation = dataclasses.replace(cfg.eval, path=_absolute(cfg.eval.path, True))
    dpo = dataclasses.replace(cfg.dpo, eval_path=_absolute(cfg.dpo.eval_path, True))
    logging = dataclasses.replace(cfg.logging, output_dir=_absolute(cfg.logging.output_dir, False))
    checkpoint = dataclasses.replace(
        cfg.checkpoint,
        dir=_absolute(cfg.checkpoint.dir, False),
        resume=cfg.checkpoint.resume if cfg.checkpoint.resume in ("none", "auto") else _absolute(cfg.checkpoint.resume, True),
    )
    items = []
    for item in cfg.graders.items:
        if item.spec_file:
            item = dataclasses.replace(item, spec=json.loads(Path(item.spec_file).read_text()), spec_file="")
        items.append(dataclasses.replace(item, model_path=_absolute(item.model_path, True)))
    graders = dataclasses.replace(cfg.graders, items=items)
    return dataclasses.replace(
        cfg, model=model, data=data, eval=evaluation, dpo=dpo, logging=logging, checkpoint=checkpoint, graders=graders
    )


def job_env(cfg: Config, extra: list[str]) -> dict[str, str]:
    names = list(FORWARDED_ENV) + [item.api_key_env for item in cfg.graders.items if item.type == "openai"]
    env = {name: os.environ[name] for name in names if os.environ.get(name)}
    for entry in extra:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env: expected KEY=VALUE, got {entry!r}")
        env[key] = value
    return env


def submission_id(cfg: Config) -> str:
    name = cfg.logging.run_name or Path(cfg.logging.output_dir).name or cfg.algorithm
    return f"rlft-{re.sub(r'[^A-Za-z0-9_.-]', '-', name)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise ConnectionError(f"--address {address}: no Ray job server answers there ({err})".splitlines()[0]) from err


def _submit_job(client, **kwargs) -> str:
    """``client.submit_job``, retried for up to a minute while a freshly started head's job agent is not up yet
    (Ray answers "No available agent to submit job, please try again later")."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit(config: str, overrides: list[str], address: str, follow: bool, env: list[str], job_id: str = "") -> int:
    cfg = portable_config(load_config(config, overrides))
    job = job_id or submission_id(cfg)
    staging = Path(tempfile.mkdtemp(prefix="rlft-submit-"))
    (staging / "config.yaml").write_text(to_yaml(cfg))
    runtime_env = {
        "working_dir": str(staging),
        "py_modules": [str(Path(rlft.__file__).parent)],
        "env_vars": {**job_env(cfg, env), "RLFT_JOB_ID": job},
    }
    client = _client(address)
    _submit_job(
        client,
        entrypoint="python -m rlft.cli train config.yaml",
        submission_id=job,
        runtime_env=runtime_env,
        metadata={"rlft_algorithm": cfg.algorithm, "rlft_output_dir": cfg.logging.output_dir},
    )
    print(f"submitted job {job} to {address}")
    print(f"  output:  {cfg.logging.output_dir} (on the cluster's nodes)")
    print(f"  logs:    ray job logs {job} --address {address} --follow")
    print(f"  scale:   rlft scale {job} --rollout-workers N --address {address}")
    print(f"  stop:    ray job stop {job} --address {address}")
    sys.stdout.flush()
    if not follow:
        return 0
    return follow_job(client, job)


def follow_job(client, job: str, poll_s: float = 1.0) -> int:
    """Stream the job's log until it ends; 0 when it succeeded. Ctrl-C stops following, not the job."""
    shown = 0
    try:
        while True:
            status = client.get_job_status(job)
            logs = client.get_job_logs(job)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
            if status.is_terminal():
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job} goes on")
        return 130
    info = client.get_job_info(job)
    print(f"job {job}: {info.status.value}" + (f" ({info.message})" if info.message and info.status.value != "SUCCEEDED" else ""))
    return 0 if info.status.value == "SUCCEEDED" else 1


def scale(job: str, rollout_workers: int, address: str) -> int:
    """Ask a running job for ``rollout_workers`` rollout workers, from its next step on. ``address``: the job
    server (``http://HEAD:8265``; the request then runs as a small job on the cluster) or a Ray address (``auto``,
    ``HEAD:6379``)."""
    if rollout_workers < 1:
        raise ConfigError(f"--rollout-workers: need at least 1, got {rollout_workers}")
    if address.startswith(("http://", "https://")):
        client = _client(address)
        ask = _submit_job(
            client,
            entrypoint=f"python -m rlft.cli scale {job} --rollout-workers {rollout_workers} --address auto",
            runtime_env={"py_modules": [str(Path(rlft.__file__).parent)]},
            entrypoint_num_cpus=0,
        )
        while not client.get_job_status(ask).is_terminal():
            time.sleep(0.5)
        lines = [line for line in client.get_job_logs(ask).splitlines() if line.startswith(("rlft", "job "))]
        print("\n".join(lines))
        return 0 if client.get_job_status(ask).value == "SUCCEEDED" else 2
    # Ray only here: `rlft submit` talks to the Jobs API over HTTP and loads no Ray.
    import ray

    from rlft.controller.control import request_scale
    from rlft.distributed.cluster import keep_on_loopback

    if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        # The private cluster of an `rlft train` job on this machine: it listens on loopback, and so must this
        # driver; Ray started it with token authentication and this user's token, which this driver then sends.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        keep_on_loopback()
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    status = request_scale(job, rollout_workers)
    where = f" (step {status['step']} of {status['total_steps']} done)" if status else ""
    now = f"{status['rollout_workers']} -> " if status else ""
    print(f"job {job}: rollout workers {now}{rollout_workers} from the next step{where}")
    return 0
