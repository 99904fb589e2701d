"""Which accelerate launchers the RL stages accept: one process, DDP and FSDP (sharded by the toolkit
with FSDP2, on CPUs too: tests/test_fsdp.py trains that way); DeepSpeed is refused before anything
trains, in one line naming what works."""

from __future__ import annotations

import pytest

from alignment.cli import main
from alignment.pipeline import distributed, plan
from alignment.stages import common

from .conftest import RECIPES


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_rl_stages_refuse_deepspeed_in_one_line(in_tmp, tiny_base, reward_dir, monkeypatch, capsys, stage):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code = main(["run", str(RECIPES / f"{stage}.yaml"), f"model={tiny_base}", f"reward_model={reward_dir}",
                 "report.models={}", "output_dir=out/rl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"stage '{stage}' does not run under DeepSpeed" in err[0] and "multi_gpu.yaml" in err[0]
    assert "use FSDP2" in err[0] and "recipes/accelerate/fsdp.yaml" in err[0]
    assert not (in_tmp / "out").exists()


def test_rl_stage_under_deepspeed_is_refused_before_the_chain_trains(in_tmp, tiny_base, reward_dir, monkeypatch):
    """The refusal comes at plan time: an sft -> ppo chain stops before sft runs."""
    from alignment.errors import RecipeError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match="stage 'ppo' does not run under DeepSpeed"):
        plan(RECIPES / "ppo.yaml", [f"reward_model={reward_dir}"])
    plan(RECIPES / "sft.yaml", [f"sft:model={tiny_base}"])  # trainer stages are left to accelerate's DeepSpeed


def test_rl_stages_under_fsdp_are_sharded_by_the_toolkit_on_cpus_and_gpus(tiny_base, reward_dir, monkeypatch):
    """Under an FSDP launch the RL stages are planned as FSDP2 (part of their hash: an output trained as
    DDP is not reused), on a CPU machine as on a GPU one; the trainer stages stay accelerate's (DDP on
    a CPU); with one process nothing is sharded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = [f"model={tiny_base}", f"reward_model={reward_dir}"]
    for on_gpu in (False, True):
        monkeypatch.setattr(common, "use_cpu", lambda: not on_gpu)
        monkeypatch.setattr(common, "device_kind", lambda: "cuda/any" if on_gpu else "cpu/any")
        assert common.distributed_type(2) == ("fsdp" if on_gpu else "ddp")  # accelerate's FSDP: GPUs only
        [fsdp2] = plan(RECIPES / "ppo.yaml", args, num_processes=2)
        assert distributed(fsdp2.recipe, 2) == "fsdp2" and distributed(fsdp2.recipe, 1) == "single"
        sft = plan(RECIPES / "sft.yaml", [f"sft:model={tiny_base}"], num_processes=2)[-1]
        assert distributed(sft.recipe, 2) == ("fsdp" if on_gpu else "ddp")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    [ddp] = plan(RECIPES / "ppo.yaml", args, num_processes=2)
    assert ddp.hash != fsdp2.hash
