"""Which accelerate launchers the RL stages accept: one process and DDP; DeepSpeed and (on GPUs)
FSDP are refused before anything trains, in one line naming what works."""

from __future__ import annotations

import pytest

from alignment.cli import main
from alignment.pipeline import plan
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
    assert not (in_tmp / "out").exists()


def test_rl_stage_under_deepspeed_is_refused_before_the_chain_trains(in_tmp, tiny_base, reward_dir, monkeypatch):
    """The refusal comes at plan time: an sft -> ppo chain stops before sft runs."""
    from alignment.errors import RecipeError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match="stage 'ppo' does not run under DeepSpeed"):
        plan(RECIPES / "ppo.yaml", [f"reward_model={reward_dir}"])
    plan(RECIPES / "sft.yaml", [f"sft:model={tiny_base}"])  # trainer stages are left to accelerate's DeepSpeed


def test_fsdp_is_refused_on_gpus_and_is_ddp_on_a_cpu(tiny_base, reward_dir, monkeypatch):
    from alignment.errors import RecipeError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = [f"model={tiny_base}", f"reward_model={reward_dir}"]
    assert common.distributed_type(2) == "ddp"  # accelerate applies FSDP on GPUs only
    [node] = plan(RECIPES / "ppo.yaml", args, num_processes=2)
    monkeypatch.setattr(common, "use_cpu", lambda: False)  # as on a GPU machine
    assert common.distributed_type(2) == "fsdp"
    with pytest.raises(RecipeError, match="stage 'ppo' does not run under FSDP; it runs on one process or as DDP"):
        plan(RECIPES / "ppo.yaml", args, num_processes=2)
