"""Running on a Ray cluster: the fit check and placement, actors replaced when they die, `rlft submit` and
`rlft scale` against a multi-node cluster on this machine (launch/local_cluster.py, token auth on)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import ray

from cluster_helpers import kill_actor_during, rlft_popen, start_local_cluster, steps_logged, wait_until
from conftest import ROOT, run_rlft
from rlft.config import load_config
from rlft.controller.run import job_demands
from rlft.distributed.actors import Resources, WorkerSet, spawn
from rlft.distributed.placement import ClusterFitError, check_fit
from rlft.errors import RestartBudgetError
from rlft.jobs import portable_config

# ---------------------------------------------------------------------------------------------------------------
# What each role asks for, and whether it fits: pure functions of the config and the nodes' free resources.


def test_demands_follow_the_config_and_colocation_merges_the_reference_into_learner_bundles():
    cfg = load_config(ROOT / "configs/grpo_tiny.yaml", ["rl.kl_coef=0.1", "rollout.num_rollout_workers=3"])
    demands = {d.role: d for d in job_demands(cfg, reference=True)}
    assert (demands["learners"].count, demands["learners"].cpus) == (2, 1.0)
    assert (demands["rollout"].count, demands["reference"].count, demands["graders"].count) == (3, 1, 1)

    colocated = load_config(
        ROOT / "configs/grpo_tiny.yaml",
        ["reference.colocate_with_learners=true", "learner.num_gpus_per_learner=0.75",
         "reference.num_gpus_per_replica=0.25", "learner.backend=gloo"],
    )
    demands = {d.role: d for d in job_demands(colocated, reference=True)}
    assert "reference" not in demands
    assert demands["learners"].bundle == {"CPU": 2.0, "GPU": 1.0}


def test_colocation_needs_no_more_replicas_than_learners():
    with pytest.raises(ValueError, match=r"reference.colocate_with_learners: .*num_replicas \(3\)"):
        load_config(None, ["reference.colocate_with_learners=true", "reference.num_replicas=3"])


def test_fit_check_places_bundles_on_nodes_and_names_the_fields_when_it_cannot():
    cfg = load_config(ROOT / "configs/grpo_tiny.yaml", ["rollout.num_gpus_per_worker=1"])
    demands = job_demands(cfg, reference=False)
    check_fit(demands, [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0}])  # 4 CPUs, the GPU where the worker goes
    with pytest.raises(ClusterFitError) as err:
        check_fit(demands, [{"CPU": 8.0}])
    message = str(err.value)
    assert "needs 4 CPUs and 1 GPUs, the cluster has 8 CPUs and 0 GPUs" in message
    assert "rollout.num_rollout_workers, rollout.num_cpus_per_worker, rollout.num_gpus_per_worker" in message
    # Enough CPUs in total, but no node holds a 3-CPU learner bundle: bundles never span nodes.
    big = job_demands(load_config(ROOT / "configs/grpo_tiny.yaml", ["learner.num_cpus_per_learner=3"]), False)
    with pytest.raises(ClusterFitError, match="no node has room for one learners actor"):
        check_fit(big, [{"CPU": 2.0}] * 5)


def test_actors_of_a_cluster_started_here_need_no_runtime_env_of_their_own():
    """A local cluster's workers inherit the role environment from the process that starts it, so its actors carry
    no ``runtime_env`` (and can take Ray's prestarted workers); an actor whose environment differs, or one on a
    cluster joined by address, carries the whole of its environment."""
    from rlft.distributed import actors

    saved_environ, saved_inherited = dict(os.environ), dict(actors._inherited_env)
    try:
        actors.hand_down_role_env(0)
        env = actors.role_env(0)
        assert {k: os.environ[k] for k in env} == env
        assert actors.runtime_env_for(env) is None
        assert actors.runtime_env_for({**env, "RLFT_STACK_HANDLER_DIR": "/elsewhere"}) == {
            "env_vars": {**env, "RLFT_STACK_HANDLER_DIR": "/elsewhere"}}
        assert actors.runtime_env_for(actors.role_env(1)) is None  # a subset: nothing to add
        actors.forget_role_env()
        assert actors.runtime_env_for(env) == {"env_vars": env}
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        actors._inherited_env.clear()
        actors._inherited_env.update(saved_inherited)


@pytest.mark.parametrize("algorithm, overrides, roles", [
    ("sft", [], {"reference": False, "rollout": False, "graders": False}),
    ("dpo", [], {"reference": True, "rollout": False, "graders": False}),
    ("dpo", ["model.lora.rank=8"], {"reference": False, "rollout": False, "graders": False}),
    ("grpo", [], {"reference": False, "critic": False}),
    ("grpo", ["rl.kl_coef=0.01"], {"reference": True, "critic": False}),
    ("ppo", [], {"reference": False, "critic": True}),
    ("ppo", ["rl.kl_coef=0.05"], {"reference": True, "critic": True}),
    ("online_dpo", [], {"reference": True, "critic": False}),
])
def test_the_roles_a_job_starts_size_its_local_cluster_before_the_controller_loads(algorithm, overrides, roles):
    """``job_roles`` says which roles an algorithm starts beside its learners; Ray is started (and sized) from it
    while the controller's modules load, and ``Run.start_cluster`` places the same roles."""
    from rlft.controller.run import job_roles

    cfg = load_config(ROOT / f"configs/{algorithm}_tiny.yaml", overrides)
    assert job_roles(cfg) == roles


def test_submitted_config_carries_absolute_paths_and_inlined_grader_specs(tmp_path, monkeypatch):
    spec = tmp_path / "spec.json"
    spec.write_text('{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", '
                    '"reference": "{{item.answer}}", "operation": "eq"}')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        ROOT / "configs/grpo_tiny.yaml",
        ["logging.output_dir=runs/x", "graders.items=[{name: exact, type: openai, spec_file: spec.json}]"],
    )
    portable = portable_config(cfg)
    assert portable.logging.output_dir == str(tmp_path / "runs/x")
    assert portable.data.train_path == "tiny://arithmetic/rft_train.jsonl"
    assert portable.graders.items[0].spec["operation"] == "eq" and portable.graders.items[0].spec_file == ""


@pytest.mark.ray
def test_grpo_that_does_not_fit_the_cluster_stops_before_any_actor(ray_cluster, tmp_path):
    from rlft.controller.grpo import grpo

    cfg = load_config(
        ROOT / "configs/grpo_tiny.yaml",
        ["model.path=tiny://model", "rollout.num_gpus_per_worker=1", f"logging.output_dir={tmp_path / 'run'}"],
    )
    actors_before = len(ray.util.list_named_actors(all_namespaces=True)), ray.available_resources()["CPU"]
    with pytest.raises(ClusterFitError, match=r"(?s)the job does not fit the cluster.*rollout 1 × \(1 CPU, 1 GPU\)"):
        grpo(cfg)
    # Nothing was started or reserved.
    assert (len(ray.util.list_named_actors(all_namespaces=True)), ray.available_resources()["CPU"]) == actors_before


LOOPBACK_PROBE = """
import json, os
import psutil
import rlft.cli  # imports Ray first, as `rlft train` does
from rlft.config import RayConfig
from rlft.distributed.cluster import init_ray
init_ray(RayConfig(num_cpus=2), 2)
import ray
pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
listening = sorted({c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in pids})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": listening}))
"""


@pytest.mark.slow  # starts Ray clusters of its own
def test_a_local_cluster_listens_on_loopback_only():
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["gcs"].startswith("127.0.0.1:")
    assert probe["listening"] and set(probe["listening"]) <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, probe


# ---------------------------------------------------------------------------------------------------------------
# WorkerSet: the restart machinery every role facade uses.


class _Flaky:
    """Dies (the whole process) on its first call when ``die_first`` names a file that does not exist yet."""

    def __init__(self, marker: str):
        self.marker = marker

    def work(self, x: int) -> int:
        if self.marker and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return x * 10


@pytest.mark.ray
def test_worker_set_replaces_a_dead_actor_and_redoes_its_calls_once(ray_cluster, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test module
    markers = [str(tmp_path / "slot0_died"), ""]
    starts = []

    def start(slot):
        starts.append(slot)
        return spawn(_Flaky, markers[slot], resources=Resources(num_cpus=0.1))

    workers = WorkerSet("toy", start, 2, max_restarts=1)
    try:
        calls = {key: (key % 2, lambda w, key=key: w.work.remote(key)) for key in range(6)}
        results = list(workers.as_completed(calls))
        assert sorted(results) == [(key, key * 10) for key in range(6)]  # each call once, none lost
        assert workers.restarts == 1 and starts == [0, 1, 0]
        # The budget is spent: the next death stops the role with a clear error.
        os.remove(markers[0])
        with pytest.raises(RestartBudgetError, match=r"toy actor 0 died .* ray.max_actor_restarts = 1"):
            workers.call([(0, lambda w: w.work.remote(1))])
    finally:
        workers.shutdown()


class _Slow:
    def work(self, x: int) -> tuple[int, int]:
        time.sleep(0.5)
        return x * 10, os.getpid()


@pytest.mark.ray
def test_calls_sent_ahead_survive_removing_their_actor(ray_cluster, tmp_path):
    """Asynchronous RL sends a step's generation before the step, and ``rlft scale`` may remove a worker meanwhile:
    the removed actor's calls go to the others, each key comes back once, and no replacement is counted."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    workers = WorkerSet("toy", lambda slot: spawn(_Slow, resources=Resources(num_cpus=0.1)), 2, max_restarts=0)
    try:
        survivor = workers.call([(0, lambda w: w.work.remote(0))])[0][1]
        sent = workers.submit({key: (key % 2, lambda w, key=key: w.work.remote(key)) for key in range(6)})
        workers.remove_last()
        results = dict(workers.results(sent))
        assert sorted(results) == list(range(6)) and all(results[k][0] == k * 10 for k in range(6))
        assert {pid for _, pid in results.values()} == {survivor}  # slot 1's calls were redone on slot 0
        assert workers.restarts == 0
    finally:
        workers.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# End to end on a multi-node cluster on this machine: 2 nodes of 3 CPUs, token auth on.

SMALL_GRPO = [
    "model.path=tiny://model",
    "rl.num_prompts_per_step=16",
    "rl.num_samples_per_prompt=4",
    "trainer.global_batch_size=64",
    "learner.micro_batch_size_per_learner=32",
    "eval.num_examples=0",
    "logging.wandb=false",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def local_cluster():
    cluster = start_local_cluster(worker_nodes=1, cpus_per_node=3)
    yield cluster
    cluster.stop()


@pytest.mark.slow  # starts Ray clusters of its own
def test_local_cluster_has_two_loopback_nodes_and_token_auth(local_cluster):
    assert local_cluster.env["RAY_AUTH_MODE"] == "token"
    probe = (
        "import ray; ray.init(address='auto', logging_level='ERROR'); "
        "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"
    )
    ok = subprocess.run([sys.executable, "-c", probe], env={**local_cluster.client_env(), "RAY_ADDRESS":
                        local_cluster.gcs_address}, capture_output=True, text=True, timeout=120)
    assert ok.stdout.strip() == "['127.0.0.1', '127.0.0.1']", ok.stderr[-2000:]
    # Without the token the cluster refuses the client.
    no_token = {k: v for k, v in local_cluster.client_env().items() if k != "RAY_AUTH_TOKEN_PATH"}
    refused = subprocess.run(
        [sys.executable, "-m", "rlft.cli", "scale", "nope", "--rollout-workers", "2", "--address",
         local_cluster.job_server], env=no_token, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert refused.returncode != 0


PLACEMENT_PROBE = """
import json, sys
import ray
from ray.util import placement_group_table
from rlft.config import load_config
from rlft.controller.run import job_demands
from rlft.distributed.placement import Placement
ray.init(address="auto", logging_level="ERROR")
cfg = load_config(sys.argv[1], ["rl.kl_coef=0.1", "reference.colocate_with_learners=true", *sys.argv[2:]])
placement = Placement(job_demands(cfg, reference=True), cfg.ray, colocate_reference=True)
learners = placement.groups["learners"]
ref = placement.resources("reference", 1, 1.0, 0.0)
print(json.dumps({
    "roles": sorted(placement.groups),
    "learner_nodes": placement_group_table(learners)["bundles_to_node_id"],
    "learner_bundle": placement_group_table(learners)["bundles"][0],
    "reference_in_learner_bundle": ref.placement_group.id == learners.id and ref.bundle_index == 1,
}))
placement.remove()
"""


@pytest.mark.parametrize("strategy, same_node", [("strict_spread", False), ("strict_pack", True)])
def test_placement_groups_follow_the_strategy_and_colocate_the_reference(local_cluster, strategy, same_node):
    import json

    proc = subprocess.run(
        [sys.executable, "-c", PLACEMENT_PROBE, str(ROOT / "configs/grpo_tiny.yaml"),
         f"ray.placement_strategy={strategy}", "learner.num_cpus_per_learner=1", "reference.num_cpus_per_replica=0.5"],
        env={**local_cluster.client_env(), "RAY_ADDRESS": local_cluster.gcs_address},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["roles"] == ["learners", "rollout"]  # graders are not placed; the reference shares the learners'

    assert probe["learner_bundle"] == {"CPU": 1.5}  # learner + colocated reference replica
    nodes = set(probe["learner_nodes"].values())
    assert len(nodes) == (1 if same_node else 2)
    assert probe["reference_in_learner_bundle"]


@pytest.mark.slow
@pytest.mark.vllm
def test_submitted_job_survives_killed_actors_and_scales_its_rollout_workers(local_cluster, tmp_path):
    """`rlft submit --follow` runs GRPO (with a reference) through the Jobs API. While it runs: a rollout worker is
    killed while it generates, then a grader worker and the reference replica while a step is being generated
    (before they get its work); each is replaced and its work of that step done by the replacement. Then
    `rlft scale` takes the job from 1 to 2 rollout workers and back to 1 between steps. Every step keeps all its
    samples, and every worker, replaced or added, samples with the learner's current weights."""
    out, log = tmp_path / "run", tmp_path / "submit.log"
    num_steps = 30
    proc = rlft_popen(
        "submit", str(ROOT / "configs/grpo_tiny.yaml"), *SMALL_GRPO, f"trainer.max_steps={num_steps}",
        "rl.kl_coef=0.01", "ray.max_actor_restarts=1", f"logging.output_dir={out}", "--follow",
        "--job-id", "rlft-test-job", "--address", local_cluster.job_server,
        cwd=tmp_path, env=local_cluster.client_env(), log=log,
    )
    metrics = out / "metrics.jsonl"

    def scale(workers: int, address: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "rlft.cli", "scale", "rlft-test-job", "--rollout-workers", str(workers),
             "--address", address], env=local_cluster.client_env(), capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        generating = "ray::RolloutWorker.generate"
        for after_step, victim in ((2, generating), (4, "ray::GraderWorker"), (6, "ray::ReferenceWorker")):
            wait_until(lambda n=after_step: len(steps_logged(metrics)) >= n, f"step {after_step}", proc=proc, log=log)
            kill_actor_during(generating, victim, local_cluster.proc)
        assert "rollout workers 1 -> 2 from the next step" in scale(2, local_cluster.job_server)
        wait_until(lambda: any(r["rollout/num_workers"] == 2 for r in steps_logged(metrics)), "2 workers",
                   proc=proc, log=log)
        scale(1, local_cluster.gcs_address)
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        proc.kill()
    assert "submitted job rlft-test-job" in log.read_text()
    assert "job rlft-test-job: SUCCEEDED" in log.read_text()
    steps = steps_logged(metrics)
    assert [r["step"] for r in steps] == list(range(1, num_steps + 1))
    workers = [r["rollout/num_workers"] for r in steps]
    assert workers[0] == 1 and 2 in workers and workers[-1] == 1, workers
    last = steps[-1]
    assert (last["faults/rollout_restarts"], last["faults/grader_restarts"], last["faults/reference_restarts"]) == (
        1, 1, 1), last
    for r in steps:
        assert r["rollout/num_samples"] == 16 * 4
        assert r["graders/errors"] == r["graders/timeouts"] == 0
        assert r["rollout/policy_version_lag"] == 0
        assert r["sync/logprob_max_abs_diff"] < 1e-3, r


def test_scale_names_the_running_jobs_when_the_job_is_unknown(local_cluster, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlft.cli", "scale", "no-such-job", "--rollout-workers", "2", "--address",
         local_cluster.gcs_address], env=local_cluster.client_env(), capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "no running rlft job 'no-such-job' on this cluster" in proc.stderr


def test_submit_of_a_bad_config_fails_before_contacting_the_cluster(tmp_path):
    proc = run_rlft("submit", str(ROOT / "configs/grpo_tiny.yaml"), "rl.clip_low=-1", "--address",
                    "http://127.0.0.1:9", cwd=tmp_path, timeout_s=120)
    assert proc.returncode == 2
    assert "rl.clip_low" in proc.stderr


def test_submit_to_an_address_with_no_job_server_is_a_clear_error(tmp_path):
    proc = run_rlft("submit", str(ROOT / "configs/grpo_tiny.yaml"), "--address", "http://127.0.0.1:9", cwd=tmp_path,
                    timeout_s=120)
    assert proc.returncode == 1
    assert "rlft: cannot reach the cluster" in proc.stderr and "http://127.0.0.1:9" in proc.stderr

