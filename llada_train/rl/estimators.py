"""The RL likelihood estimators, registered once (verl's `register_policy_loss`): this registry is the
list of valid `rl.estimator` names, and the RL stage takes an estimator's two steps from it.

An estimator is two functions with the signatures of `rl/ebpo.py`'s `build_batch` and
`ebpo_update`:

    build_batch(model, input_ids, response_mask, rewards, policy, options, *, block_size, pad_mask=None,
                ref_model=None, generator=None, mask_token_id=None) -> (batch, metrics)
    update(model, step_fn, batch, policy, options, *, generator=None, mask_token_id=None,
           steps_per_pass=None) -> [metrics, ...]

`policy` is the `rl` section (`rl/policy.py`'s PolicyConfig keys); `options` is the estimator's own
config section `rl.<name>` (None for an estimator without keys).
"""

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from ..refs import resolve_ref


@dataclass(frozen=True)
class Estimator:
    name: str
    build_batch: Callable | str  # a function or "module:function" (imported on first use)
    update: Callable | str

    def steps(self) -> tuple[Callable, Callable]:
        """(build_batch, update) as functions."""
        return resolve_ref(self.build_batch), resolve_ref(self.update)


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str, build_batch: Callable | str, update: Callable | str) -> Estimator:
    if name in ESTIMATORS:
        raise ValueError(f"estimator '{name}' is registered already")
    ESTIMATORS[name] = Estimator(name, build_batch, update)
    return ESTIMATORS[name]


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ConfigError(f"bad value for 'rl.estimator': '{name}'; registered estimators: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name]


# EBPO's block-level ELBO ratio (LLaDA2.1) and d1's one-step estimate (Zhao et al. 2025)
register_estimator("ebpo", "llada_train.rl.ebpo:build_batch", "llada_train.rl.ebpo:ebpo_update")
register_estimator("diffu_grpo", "llada_train.rl.diffu_grpo:build_diffu_grpo_batch",
                   "llada_train.rl.diffu_grpo:diffu_grpo_update")
