"""Distributed init and DeepSpeed engine construction (ZeRO 0-3, fp32/bf16, accumulation, clipping).

One process needs no launcher: the env defaults below make it a world of one. `torchrun`,
`deepspeed` and `srun` set the same variables. On CPU the backend is gloo (DS_ACCELERATOR=cpu).
"""

import math
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from . import expert_parallel as ep
from .errors import ConfigError, UserError
from .expert_parallel import autoep_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefer_env_ninja():
    """DeepSpeed JIT-builds its CPU shm op with the first `ninja` on PATH. The venv's ninja and a
    system one hash the build commands differently, so processes started with and without the
    venv on PATH rebuild the op for each other (a minute per start); always use the venv's."""
    env_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(env_bin) / "ninja").is_file() and path.split(os.pathsep)[0] != env_bin:
        os.environ["PATH"] = env_bin + os.pathsep + path


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); initialises torch.distributed once."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _prefer_env_ninja()
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    # A world of one needs no TCP rendezvous: a port picked here could be taken by another run's
    # sockets before the store binds it, and a MASTER_PORT left in the environment (inherited from
    # a parent that ran a stage in-process) would make concurrent runs collide on it.
    single = os.environ.get("WORLD_SIZE", "1") == "1"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not single:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if single:
            store = Path(tempfile.mkdtemp(prefix="llada_train_pg_")) / "store"
            torch.distributed.init_process_group(backend, init_method=store.as_uri(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def reduce_over_ranks(*values: float, op: str = "sum") -> list[float]:
    """`values` summed (or min / max) over all ranks; unchanged without torch.distributed."""
    if not torch.distributed.is_initialized():
        return [float(v) for v in values]
    # NCCL reduces device tensors only (gloo, CPU ones)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=ops[op])
    return t.tolist()


def lr_factor(step: int, optim, total_steps: int) -> float:
    """Linear warm-up, then cosine to min_lr_ratio, WSD (stable, then linear decay) or constant."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr_ratio
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "wsd":
        decay_start = total_steps - int(optim.decay_fraction * total_steps)
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(1, total_steps - decay_start)
        return 1.0 - (1.0 - floor) * frac
    frac = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def deepspeed_config(cfg, micro_batch: int) -> dict:
    engine = cfg.engine
    zero = {"stage": engine.zero_stage}
    if engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if engine.offload_params and engine.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": engine.precision == "bf16"},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        **({"expert_parallel": autoep_config(engine.expert_parallel)} if engine.expert_parallel > 1 else {}),
    }


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings and router biases. Empty groups are left out
    (DeepSpeed drops them, which would desynchronise the LR scheduler's per-group lambdas; LoRA
    adapters, for one, are all matrices)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be dropped: DeepSpeed's ZeRO and bf16 wrappers all end in this
    optimizer's `step`, so a voided step leaves weights, moments and lr untouched at every stage."""

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


class Engine:
    """What the trainer and stages need of the training engine (DeepSpeed here): forward, backward,
    step, the trained module, checkpoint state and a full state dict for export. Nothing outside
    this module calls the DeepSpeed API."""

    def __init__(self, ds_engine, optimizer: SkippableAdamW):
        self._ds = ds_engine
        self._optimizer = optimizer  # the innermost optimizer, under DeepSpeed's wrappers
        self._step_hooks: list = []
        self.expert_layers: list = []  # AutoEP's MoE layers under engine.expert_parallel > 1

    def __call__(self, *args, **kwargs):
        return self._ds(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        """The model as trained (a peft wrapper under LoRA); forwards through it skip DeepSpeed."""
        return self._ds.module

    @property
    def config(self):
        return self._ds.module.config

    @property
    def training(self) -> bool:
        return self._ds.training

    def train(self, mode: bool = True):
        self._ds.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        return self._ds.module.parameters()

    def get_input_embeddings(self):
        return self._ds.module.get_input_embeddings()

    @property
    def lr(self) -> float:
        return self._optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor | None, *, void: bool = False) -> torch.Tensor:
        """Backward + optimizer step. `loss` None or `void`: a zero loss, so every rank still joins the
        step's collectives; `void` drops the update (weights, optimizer moments and lr untouched; the
        schedule still advances). Returns the loss used."""
        if loss is None or void:
            loss = sum(p.sum() * 0.0 for p in self._ds.module.parameters() if p.requires_grad)
        self._ds.backward(loss)
        if void and self._ds.is_gradient_accumulation_boundary():
            self._optimizer.skip_next_step = True
        self._ds.step()
        self._optimizer.skip_next_step = False
        return loss

    def register_step_hook(self, hook) -> None:
        """`hook()` runs after each trainer step whose updates were applied (not after a voided one)."""
        self._step_hooks.append(hook)

    def run_step_hooks(self) -> None:
        for hook in self._step_hooks:
            hook()

    def save_state(self, directory: Path) -> None:
        """Model, optimizer and schedule state of this rank under `directory/engine` (collective)."""
        self._ds.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        self._ds.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=True)

    @property
    def expert_parallel(self) -> int:
        """Ranks sharing one copy of the routed experts (1 without AutoEP)."""
        return self.expert_layers[0].ep_size if self.expert_layers else 1

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: each rank holds only a shard of every parameter."""
        return self._ds.zero_optimization_partition_weights()

    @contextmanager
    def gathered(self):
        """The whole module's parameters materialised on every rank (ZeRO-3 partitions gathered)."""
        if self.partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    @property
    def sharded(self) -> bool:
        """Whether a forward is a collective: ZeRO-3 gathers over several ranks, or expert
        all-to-alls. Then every rank must run the same number of forwards (`join_forwards`)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return bool(self.expert_layers) or (self.partitioned and world > 1)

    @contextmanager
    def counting_forwards(self):
        """Counts the model's forwards inside the block: `with engine.counting_forwards() as n: ...; n[0]`."""
        count = [0]
        handle = self.module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        try:
            yield count
        finally:
            handle.remove()

    def placeholder_loss(self) -> torch.Tensor:
        """One forward of a one-token row, in eval mode (no expert-load counting), as a zero loss
        with a graph: what a sharded rank with nothing left to train on runs so that its forward
        and backward collectives pair up with the other ranks'."""
        was_training = self.module.training
        self.module.eval()
        try:
            device = next(self.module.parameters()).device
            ids = torch.full((1, 1), self.config.eos_token_id, dtype=torch.long, device=device)
            return self._ds(input_ids=ids).logits.float().sum() * 0.0
        finally:
            self.module.train(was_training)

    def join_forwards(self, own: int) -> None:
        """No-grad placeholder forwards until this rank has run as many as the busiest rank."""
        for _ in range(int(reduce_over_ranks(float(own), op="max")[0]) - own):
            with torch.no_grad():
                self.placeholder_loss()

    def full_state_dict(self) -> dict:
        """Unsharded model weights on CPU (ZeRO-3 partitions gathered, and copied out before they are
        released again), on every rank: a collective when sharded."""
        with self.gathered() as module:
            state = {k: v.detach().cpu().clone() if self.partitioned else v.detach().cpu()
                     for k, v in module.state_dict().items()}
        if self.expert_layers:  # AutoEP names and E/N experts per rank -> the model's fused layout
            by_prefix = {name: m for name, m in self.module.named_modules() if m in self.expert_layers}
            state = ep.to_model_layout(state, by_prefix)
        return state


ENGINE_TAG = "engine"  # the engine state's sub-directory of a checkpoint


def saved_state_dict(ckpt: Path) -> dict:
    """Full model weights of a checkpoint written by `Engine.save_state`, whatever its ZeRO stage."""
    engine_dir = Path(ckpt) / ENGINE_TAG
    if any(engine_dir.glob("layer_*_expert_*_model_states.pt")):  # AutoEP: one file per expert
        return ep.saved_state_dict(engine_dir)
    if any(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ENGINE_TAG)
    states = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise UserError(f"{engine_dir}: no DeepSpeed model states found; is this a llada-train checkpoint?")
    # DeepSpeed's metadata in this file is plain containers, so the weights-only unpickler reads it.
    return torch.load(states[0], map_location="cpu", weights_only=True)["module"]


def check_expert_parallel(model, cfg, world_size: int) -> None:
    """Refuse, before any work, what expert parallelism does not combine with."""
    n, e = cfg.engine.expert_parallel, cfg.engine
    experts = getattr(getattr(model, "config", None), "num_experts", None)
    problems = [
        (world_size % n != 0, f"must divide the number of ranks ({world_size})"),
        (experts is None or experts % n != 0, f"must divide model.num_experts ({experts})"),
        (e.zero_stage == 0, "needs engine.zero_stage 1, 2 or 3 (AutoEP reduces expert gradients through ZeRO)"),
        (getattr(getattr(cfg, "lora", None), "enabled", False),
         "does not combine with LoRA (lora.enabled); train LoRA at expert_parallel 1"),
        (getattr(getattr(cfg, "precision", None), "fp4", "none") != "none",
         "does not combine with precision.fp4 (AutoEP's expert GEMMs are its own); use expert_parallel 1"),
    ]
    for bad, why in problems:
        if bad:
            raise ConfigError(f"engine.expert_parallel={n} {why}")


def build_engine(model, cfg, micro_batch: int) -> Engine:
    """DeepSpeed engine with a torch AdamW (runs on CPU and GPU) and our LR schedule; the model then
    registers its own step hooks (MoE balancing). Under expert parallelism AutoEP swaps the MoE
    blocks inside `initialize`, so the optimizer is built from the parameters that exist after it."""
    import deepspeed

    o, expert_parallel = cfg.optim, cfg.engine.expert_parallel
    made = {}

    def make_optimizer(_params):
        groups = param_groups(model, o.weight_decay)
        if expert_parallel > 1:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = split_params_into_different_moe_groups_for_optimizer(
                [{**g, "name": f"decay_{g['weight_decay']}"} for g in groups])
        made["optimizer"] = SkippableAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        return made["optimizer"]

    if expert_parallel > 1:
        check_expert_parallel(model, cfg, torch.distributed.get_world_size())
        ep.prepare_for_autoep(model)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer, config=deepspeed_config(cfg, micro_batch),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o, cfg.train.steps)))
    engine = Engine(ds_engine, made["optimizer"])
    if expert_parallel > 1:
        engine.expert_layers = ep.adopt_autoep_layers(ds_engine.module)
        engine.register_step_hook(partial(ep.update_expert_bias, engine.expert_layers, cfg.moe.bias_update_rate))
        return engine
    register = getattr(model, "register_step_hooks", None)
    if register is not None:
        register(engine, cfg)
    return engine
