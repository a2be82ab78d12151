"""The evaluator: held-out exact-match accuracy of SFT and DPO runs, by greedy generation in a role of its own.

    evaluation = HeldOutEvaluation(cfg, eval_items(cfg))         # rlft.evaluator.worker: one actor, no CPU of its own
    metrics = evaluation.evaluate(learners, step, samples_path)  # the learners publish, the worker generates

RL runs evaluate with their rollout workers instead (``rlft.controller.evaluation``); both score with
``rlft.evaluator.results``. This package's face imports nothing: the worker's module loads torch and transformers.
"""
