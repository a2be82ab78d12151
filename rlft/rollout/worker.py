"""One rollout worker: an engine (vLLM or transformers) that samples responses and takes new weights by version.

A plain class: ``RolloutGroup`` makes it a Ray actor with ``spawn`` (or an in-process object without Ray).
"""

from __future__ import annotations

import contextlib
import logging
import hashlib
import threading
import time

from rlft import startup
from rlft.distributed.stacks import install_handler
from rlft.rollout.config import RolloutConfig, SamplingConfig
from rlft.data.samples import Sample
from rlft.names import Phase
from rlft.timing import PhaseTimer

logger = logging.getLogger(__name__)

# Seeds stay below this, leaving room for vLLM's per-sample offsets (sample j of a prompt uses seed + j).
_SEED_LIMIT = 2**62


def prompt_seed(seed: int, policy_version: int, prompt_index: int) -> int:
    """The sampling seed of one prompt: fixed by (seed, policy_version, prompt_index), unrelated across prompts."""
    digest = hashlib.blake2b(f"{seed}:{policy_version}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_LIMIT


@contextlib.contextmanager
def _compute_threads(num: int):
    """torch's intra-op threads (OpenMP) set to ``num`` for the block, then back. Through ``torch._C``: vLLM's CPU
    worker replaces ``torch.set_num_threads`` with a no-op once its engine has started. Nothing for ``num`` 0."""
    if not num:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch._C.set_num_threads(num)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


def make_engine(model_path: str, cfg: RolloutConfig, lora_rank: int = 0):
    """The engine ``rollout.engine`` names (``lora_rank`` > 0: one that takes LoRA adapters, vLLM only). Imported
    here, not at the top: a simulated worker never imports torch."""
    if lora_rank and cfg.engine != "vllm":
        raise ValueError(f"rollout.engine: {cfg.engine} does not take LoRA adapters; sync merged weights")
    if cfg.engine == "simulated":
        from rlft.rollout.simulated import SimulatedEngine

        return SimulatedEngine(model_path, cfg)
    if cfg.engine == "vllm":
        from rlft.rollout.engines import VLLMEngine

        return VLLMEngine(model_path, cfg, lora_rank)
    from rlft.rollout.engines import HFEngine

    return HFEngine(model_path, cfg)


class RolloutWorker:
    def __init__(self, model_path: str, cfg: RolloutConfig, envs=None, local_envs: bool = False, lora_rank: int = 0):
        """``envs`` (an ``EnvConfig`` naming an environment): multi-turn rollouts, each trajectory's environment in
        this worker's own pool of ``envs.num_workers`` actors (in this process when ``local_envs`` or 0).
        ``lora_rank`` > 0: the policy arrives as LoRA adapters of up to that rank (``model.lora.sync``)."""
        install_handler()  # first: a hang while the engine starts is dumped too
        startup.mark("rollout", "actor")
        # As many compute threads as the worker has CPUs (Ray's OMP_NUM_THREADS says the same for whole CPUs).
        self._threads = max(1, int(cfg.num_cpus_per_worker)) if cfg.engine != "simulated" else 0
        if self._threads:
            import torch

            torch.set_num_threads(self._threads)
        self.engine = make_engine(model_path, cfg, lora_rank)
        self._engine_lock = threading.Lock()  # see _generating
        self._endpoint = None
        self._endpoint_batcher = None
        self.model_path = model_path
        self.cfg = cfg
        self.env_cfg, self.env_pool, self.tokenizer = None, None, None
        self._agent = None
        if envs is not None and (envs.name or envs.agent):
            from transformers import AutoTokenizer

            self.env_cfg = envs
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
            if envs.name:
                from rlft.envs.runner import EnvPool

                self.env_pool = EnvPool(envs, local=local_envs)
            else:
                import secrets

                from rlft.envs.base import load_agent_function

                self._agent = load_agent_function(envs.agent)
                self._agent_token = secrets.token_urlsafe(24)
        self._policy_version = 0
        self._group = None  # this worker's membership of the weight group, when it receives in this process
        self.clock = PhaseTimer()
        startup.mark("rollout", "ready")

    def engine_seconds(self) -> dict[str, float]:
        """Seconds inside the engine since the last call, by phase: ``generate``, ``sync`` (loading weights),
        ``score``."""
        return self.clock.take()

    def policy_version(self) -> int:
        """The version of the weights the engine holds: 0 for the model it started from, then as synced."""
        return self._policy_version

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        sampling: SamplingConfig,
        num_samples_per_prompt: int,
        prompt_indices: list[int],
        num_threads: int = 0,
    ) -> list[Sample]:
        """``num_samples_per_prompt`` samples of each prompt, prompt by prompt, stamped with the policy version.
        ``num_threads`` > 0: this call's compute threads (cores the other roles leave idle), instead of the
        worker's own ``rollout.num_cpus_per_worker``."""
        seeds = [prompt_seed(sampling.seed, self._policy_version, index) for index in prompt_indices]
        if self._agent is not None:
            return self._agent_trajectories(prompt_token_ids, sampling, num_samples_per_prompt, prompt_indices)
        if self.env_pool is not None:
            return self._trajectories(prompt_token_ids, sampling, num_samples_per_prompt, prompt_indices, seeds,
                                      num_threads)
        with self._generating(num_threads):
            completions = self.engine.generate(prompt_token_ids, sampling, num_samples_per_prompt, seeds)
        return [
            Sample(
                prompt_index=index,
                prompt_token_ids=list(prompt),
                response_token_ids=c.token_ids,
                response_logprobs=c.logprobs,
                response_text=c.text,
                finish_reason=c.finish_reason,
                policy_version=self._policy_version,
            )
            for index, prompt, per_prompt in zip(prompt_indices, prompt_token_ids, completions)
            for c in per_prompt
        ]

    @contextlib.contextmanager
    def _generating(self, num_threads: int = 0):
        """The engine, alone (the actor's calls and the chat endpoint's requests take turns), timed as generation,
        with ``num_threads`` compute threads (0: the worker's own)."""
        with self._engine_lock, self.clock.phase(Phase.GENERATE), _compute_threads(num_threads or self._threads):
            yield

    @contextlib.contextmanager
    def _env_phase(self):
        """Times the block as the environments' phase, less the generation inside it (timed by ``_generating``)."""
        generating_before, start = self.clock.seconds.get(Phase.GENERATE.value, 0.0), time.perf_counter()
        try:
            yield
        finally:
            generating = self.clock.seconds.get(Phase.GENERATE.value, 0.0) - generating_before
            env = self.clock.seconds.get(Phase.ENV.value, 0.0)
            self.clock.seconds[Phase.ENV.value] = env + time.perf_counter() - start - generating

    def _trajectories(self, items: list[dict], sampling: SamplingConfig, num_samples_per_prompt: int,
                      prompt_indices: list[int], seeds: list[int], num_threads: int) -> list[Sample]:
        """Multi-turn: ``items`` are the prompts' data rows; each sample is one trajectory (``rlft/envs/``)."""
        from rlft.envs.trajectory import run_trajectories

        def generate(prompts: list[list[int]], turn_seeds: list[int]):
            with self._generating(num_threads):
                return [per_prompt[0] for per_prompt in self.engine.generate(prompts, sampling, 1, turn_seeds)]

        n = num_samples_per_prompt
        # (prompt index, data row, the trajectory's environment key, its seed): sample j of each prompt.
        rows = [(index, item, index * n + j, seed + j)
                for index, item, seed in zip(prompt_indices, items, seeds) for j in range(n)]
        with self._env_phase():
            trajs = run_trajectories(
                generate, self.tokenizer, self.env_pool, self.env_cfg,
                items=[item for _, item, _, _ in rows],
                keys=[key for _, _, key, _ in rows],
                seeds=[seed for _, _, _, seed in rows],
                max_new_tokens=sampling.max_new_tokens,
                max_total_tokens=self.env_cfg.max_total_tokens or self.cfg.max_model_len,
            )
        return [t.to_sample(index, self._policy_version) for (index, _, _, _), t in zip(rows, trajs)]

    def _agent_trajectories(self, items: list[dict], sampling: SamplingConfig, num_samples_per_prompt: int,
                            prompt_indices: list[int]) -> list[Sample]:
        """``envs.agent``: each trajectory is the user's agent function, run in a thread of its own against this
        worker's endpoint (a session per trajectory); what it sampled becomes the sample. An agent that raises,
        runs past ``envs.step_timeout_s`` × ``envs.max_turns`` or makes no call costs its trajectory (counted)."""
        url = self.serve_endpoint(self._agent_token, sampling)
        call_id = hashlib.blake2b(f"{self._policy_version}:{prompt_indices}:{time.time_ns()}".encode(),
                                  digest_size=6).hexdigest()
        rows = [(index, item, f"{call_id}-{index}-{j}") for index, item in zip(prompt_indices, items)
                for j in range(num_samples_per_prompt)]
        rewards: dict[str, float] = {}
        failures: dict[str, str] = {}

        def run(item: dict, session: str) -> None:
            try:
                reward = self._agent(dict(item), base_url=f"{url}/sessions/{session}/v1", api_key=self._agent_token)
                if reward is not None:
                    rewards[session] = float(reward)
            except Exception as err:  # noqa: BLE001 - the agent's failure costs its trajectory only
                failures[session] = f"error: {type(err).__name__}: {err}"

        with self._env_phase():  # the agents' own time (their code, HTTP); their calls' generation is timed as such
            threads = [threading.Thread(target=run, args=(item, session), daemon=True) for _, item, session in rows]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + self.env_cfg.step_timeout_s * self.env_cfg.max_turns
            for thread, (_, _, session) in zip(threads, rows):
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    failures[session] = "timeout"
        if failures:
            logger.warning("%d of %d agent trajectories failed, e.g. %s", len(failures), len(rows),
                           next(iter(failures.values())))
        samples = []
        for index, item, session in rows:
            trajectories = self._endpoint.take(session)
            if trajectories:
                t = trajectories[-1]  # an agent that rewrote its history trains on its last conversation
            else:  # nothing to train on: the prompt and an eos token outside the mask
                from rlft.envs.trajectory import Trajectory, prompt_ids

                t = Trajectory(key=0, item=item, seed=0, messages=list(item["messages"]),
                               prompt_ids=prompt_ids(self.tokenizer, item["messages"], item.get("tools")),
                               ids=[self.tokenizer.eos_token_id], logprobs=[0.0], mask=[0])
            t.env_reward = rewards.get(session, 0.0)
            t.failure = failures.get(session, "" if trajectories else "error").split(":")[0]
            samples.append(t.to_sample(index, max(t.policy_version, 0) if trajectories else self._policy_version))
        return samples

    def serve_endpoint(self, token: str, sampling: SamplingConfig, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve ``/sessions/<id>/v1/chat/completions`` (OpenAI-compatible) from this worker's engine, on
        ``host`` (loopback unless told otherwise) and ``port`` (0: any free one); returns the base URL. Requests
        must carry ``token``; ``sampling`` bounds them (``rlft/rollout/endpoint.py``)."""
        from rlft.rollout.endpoint import CallBatcher, ChatEndpoint

        if self._endpoint is None:
            from transformers import AutoTokenizer

            tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(self.model_path)

            def generate_batch(prompts: list[list[int]], call_sampling: SamplingConfig, seeds: list[int]):
                with self._generating():
                    return [c[0] for c in self.engine.generate(prompts, call_sampling, 1, seeds)]

            self._endpoint_batcher = CallBatcher(generate_batch)

            def generate(prompt_ids: list[int], call_sampling: SamplingConfig, call: int):
                seed = prompt_seed(call_sampling.seed, self._policy_version, call)
                return self._endpoint_batcher.generate(prompt_ids, call_sampling, seed)

            self._endpoint = ChatEndpoint(generate, tokenizer, sampling, token, host, port,
                                          policy_version=lambda: self._policy_version)
        return self._endpoint.url

    def endpoint_calls(self) -> dict[str, int]:
        """The endpoint's calls so far, and the engine calls (batches) that generated them."""
        batcher = self._endpoint_batcher
        return {"calls": batcher.calls, "batches": batcher.batches} if batcher else {"calls": 0, "batches": 0}

    def take_sessions(self, sessions: list[str]) -> list[Sample]:
        """The endpoint's recorded sessions as training samples, one per trajectory, ``prompt_index`` the session's
        position in ``sessions``; the sessions are forgotten."""
        if self._endpoint is None:
            return []
        return [t.to_sample(index, max(t.policy_version, 0))
                for index, session in enumerate(sessions) for t in self._endpoint.take(session)]

    def weight_ranks(self) -> int:
        """How many ranks of the weight group this worker takes: one per process holding the model."""
        return self.engine.weight_ranks if self.engine.weights_cross_processes else 1

    def join_weight_group(self, spec, first_rank: int) -> None:
        """Join the weight group (``collective`` transport) as ranks ``first_rank`` .. + ``weight_ranks()`` - 1;
        returns once every member has joined."""
        from rlft.distributed.weight_sync import WeightGroup

        self._group = None
        if self.engine.weights_cross_processes:
            self.engine.join_weight_group(spec, first_rank)  # each of the engine's processes joins itself
        else:
            self._group = WeightGroup(spec, first_rank)

    def update_weights(self, handle, rewind: bool = False) -> dict[str, float]:
        """Apply a published version (a ``WeightHandle``): all buckets in one engine update. Returns the seconds
        spent receiving the bytes and loading them into the engine. An older version than the current one is an
        error unless ``rewind`` (the learners went back to a checkpoint)."""
        from rlft.distributed.weight_sync import receive_buckets

        if handle.version < self._policy_version and not rewind:
            raise ValueError(f"policy version {handle.version} is older than the current {self._policy_version}")
        start = time.perf_counter()
        if handle.adapter is None and self.engine.weights_cross_processes and handle.transport != "object_store":
            # The engine's own processes receive (a multi-process or tensor-parallel vLLM engine).
            received = start
            with self._engine_lock, self.clock.phase(Phase.SYNC):
                self.engine.receive_weights(handle)
        else:  # into this process: full weights, or a LoRA adapter (this worker writes the files vLLM loads)
            buckets = receive_buckets(handle, self._group)
            received = time.perf_counter()
            with self._engine_lock, self.clock.phase(Phase.SYNC):
                if handle.adapter is None:
                    self.engine.update_weights(buckets)
                else:
                    self.engine.load_adapter(buckets, handle.adapter)
        self._policy_version = handle.version
        return {"receive_s": received - start, "load_s": time.perf_counter() - received}

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens before t) for t >= 1 of each sequence, under the engine's current weights."""
        with self._engine_lock, self.clock.phase(Phase.SCORE):
            return self.engine.token_logprobs(sequences)
