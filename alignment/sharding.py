"""FSDP2 for the RL loop (ppo, grpo, rloo): the toolkit shards its own models.

Under an FSDP launcher config (`recipes/accelerate/fsdp.yaml`: accelerate sets ACCELERATE_USE_FSDP)
with more than one process, `torch.distributed.fsdp.fully_shard` is applied here to each decoder
layer and then to the root of every model the loop holds: the policy and PPO's critic (trained: their
parameters, gradients and AdamW states are split over the processes) and the frozen reference and
reward models (inference only). accelerate turns FSDP on for GPUs only and takes one model per
`prepare`; applying `fully_shard` ourselves makes the CPU path (gloo, what the tests run) the GPU
path. The trainer stages (sft, reward, dpo, kto) keep accelerate's and TRL's FSDP.

What else a sharded loop needs, here:
- `generation`: rollouts from the sharded policy, by `rl.generation_gather`: 'full' gathers the whole
  policy once per rollout and decodes with no communication; 'layer' lets FSDP gather each layer at
  every decoding step (all processes then step together: transformers' synced_gpus);
- `Checkpointer`: resumable sharded checkpoints (torch.distributed.checkpoint: each process writes its
  shards) plus each process's scheduler, loop state and RNG; the final Hugging Face directory written
  by the main process from a state dict gathered to it alone (`full_state_dict`, `cpu_offload`);
- `summary`: how the stage trained (`distributed`, processes, bytes held per process).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import torch

from .errors import RecipeError

FSDP2 = "fsdp2"


def requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate's environment), on any device."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def active(accelerator) -> bool:
    """The RL loop shards: an FSDP launch with more than one process."""
    return requested() and accelerator.num_processes > 1


def local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


# --------------------------------------------------------------------------- applying fully_shard


def decoder_layers(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of every transformers model inside `root`: the modules whose class the model
    names in `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...), as accelerate's
    TRANSFORMER_BASED_WRAP finds them."""
    names = set()
    for module in root.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in root.modules() if module is not root and type(module).__name__ in names]


def shard(root: torch.nn.Module, mesh, mp_policy=None) -> torch.nn.Module:
    """fully_shard each decoder layer of `root`, then `root` itself (embeddings, final norm, heads)."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(root)
    if not layers:
        raise RecipeError(
            f"{type(root).__name__}: no decoder layers found to shard with FSDP2 (its `_no_split_modules` names none); "
            "launch this RL stage without the FSDP config"
        )
    extra = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in layers:
        fully_shard(layer, mesh=mesh, **extra)
    fully_shard(root, mesh=mesh, **extra)
    # FSDP2 keeps a root gathered after its forward by default; resharding it too frees the embeddings and
    # heads of four models between passes, and keeps `parameters()` the sharded ones the optimizer holds
    root.set_reshard_after_forward(True, recurse=False)
    return root


def shard_models(m, accelerator, bf16: bool) -> None:
    """Shard every model of the loop's `Models` in place: the policy (at its transformers model, inside
    peft's wrapper, so that `generate` and the forward both gather), PPO's critic (its per-token wrapper
    is the root), the reference and the reward model. Under bf16, layers are gathered in bf16 and
    gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from .generation import base_lm

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    shard(base_lm(m.policy), mesh, mp)
    if m.critic is not None:
        shard(m.critic, mesh, mp)
    for frozen in (m.reference, m.rewards.reward_model):
        if frozen is not None:
            shard(frozen, mesh, mp)


def fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


# --------------------------------------------------------------------------- rollouts


@contextlib.contextmanager
def generation(policy: torch.nn.Module, gather: str):
    """Sampling from a sharded policy (nothing to do for an unsharded one).

    'full': every layer is gathered once (`unshard`) and kept gathered until the rollout's replies are
    drawn, so decoding runs with no communication and each process stops when its own replies do (costs
    the whole policy's weights per process for the duration). 'layer': FSDP gathers each layer as it
    runs, at every decoding step (only one layer gathered at a time); every process then keeps stepping
    until all have finished (transformers' `synced_gpus`, which it turns on for a module marked as FSDP
    managed), since each step's gathers are collective."""
    modules = fsdp_modules(policy)
    if not modules:
        yield
        return
    from .generation import base_lm

    lm = base_lm(policy)
    if gather == "layer":
        lm._is_fsdp_managed_module = True
        try:
            yield
        finally:
            lm._is_fsdp_managed_module = False
        return
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)  # no reshard after each decoding step
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.set_reshard_after_forward(True, recurse=False)
            module.reshard()


# --------------------------------------------------------------------------- the update


def no_sync(accelerator, model):
    """accelerate's no_sync for DDP. A sharded model reduce-scatters its gradients after every
    micro-batch instead: holding them unreduced until the last one would keep a full, unsharded
    gradient per process, the memory FSDP is there to save."""
    return contextlib.nullcontext() if fsdp_modules(model) else accelerator.no_sync(model)


# --------------------------------------------------------------------------- checkpoints and the final save


class Checkpointer:
    """Sharded checkpoints of the trained models and their optimizer (torch.distributed.checkpoint),
    and each process's own small states (scheduler, loop state, RNG) beside them."""

    def __init__(self, accelerator, trained: list[torch.nn.Module], optimizer, stateful: list):
        self.accelerator = accelerator
        # one name space ('policy.…', 'critic.…') for the one optimizer over the trained models
        self.container = torch.nn.ModuleDict(dict(zip(("policy", "critic"), trained)))
        self.optimizer = optimizer
        self.stateful = stateful

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.container, self.optimizer)
        return {"model": model, "optim": optim}

    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory))
        own = {
            "stateful": [obj.state_dict() for obj in self.stateful],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        try:
            import numpy as np

            kind, keys, pos, has_gauss, cached = np.random.get_state()
            own["rng"]["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
        except ImportError:  # pragma: no cover
            pass
        torch.save(own, Path(directory) / f"process_{self.accelerator.process_index}.pt")

    def load(self, directory: str | Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.container, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        own = torch.load(Path(directory) / f"process_{self.accelerator.process_index}.pt", weights_only=True)
        for obj, saved in zip(self.stateful, own["stateful"]):
            obj.load_state_dict(saved)
        rng = own["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy as np

            kind, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole of a sharded model's state dict on the main process only, in CPU memory (every process
    takes part in the gathers; the others get an empty dict): no full copy anywhere else."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full(accelerator, policy, tok, out_dir: Path, lora, rebuild) -> None:
    """The final policy as a Hugging Face directory written by the main process. Without LoRA the
    gathered weights are saved through the model's own save_pretrained; with LoRA the main process
    rebuilds the model unsharded (`rebuild()`: base + adapters, in CPU memory), loads the gathered
    weights and saves it as every other run does (merged unless the recipe keeps the adapter)."""
    from .generation import base_lm
    from .models import save_model

    lm = base_lm(policy)
    state = full_state_dict(policy if lora is not None else lm)
    if accelerator.is_main_process:
        if lora is not None:
            model = rebuild()
            model.load_state_dict(state)
            save_model(model, tok, out_dir, lora)
        else:  # a tied weight (lm_head = embeddings) saved once, under its first name, as save_pretrained does
            first: dict[int, str] = {}
            tied = [name for name, p in lm.named_parameters(remove_duplicate=False) if first.setdefault(id(p), name) != name]
            lm.save_pretrained(out_dir, state_dict={k: v for k, v in state.items() if k not in tied},
                               safe_serialization=True)
            tok.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the summary


def summary(accelerator, trained: list[torch.nn.Module], frozen: list, optimizer) -> dict:
    """How the stage trained and what each process held: for the run summary (run_info.json)."""
    sharded = any(fsdp_modules(model) for model in trained)
    params = {id(p): p for model in [*trained, *frozen] if model is not None for p in model.parameters()}
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor) and t.dim()]
    return {
        "distributed": FSDP2 if sharded else ("ddp" if accelerator.num_processes > 1 else "single"),
        "processes": accelerator.num_processes,
        "trained_parameter_bytes_per_process": local_bytes(p for p in params.values() if p.requires_grad),
        "frozen_parameter_bytes_per_process": local_bytes(p for p in params.values() if not p.requires_grad),
        "optimizer_state_bytes_per_process": local_bytes(states),
    }
