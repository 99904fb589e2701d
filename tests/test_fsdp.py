"""The RL stages under an FSDP launch: the toolkit shards its own models with FSDP2
(alignment/sharding.py), on CPUs over gloo as on GPUs. One `accelerate launch` of two processes runs
every case (each launch costs seconds of imports per process); the one-process references run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import RECIPES, REPO
from .test_ppo import MICRO_RL

# Cases: ("update", name, recipe, overrides, out file): two iterations of the loop from the same global
# rollouts in every process (each keeps its share), plain SGD as in test_ppo's DDP test; the final
# weights (gathered) and every metric saved. ("stage", name, recipe, overrides): the stage run by the
# pipeline, as `accelerate launch recipes/x.yaml` does; ("killed", ...): the same, stopped by an error in
# every process after the iteration given, then run again (it resumes).
SCRIPT = """
import json, sys, torch
from accelerate import Accelerator
from alignment import sharding
from alignment.recipe_file import load_recipe, parse_override
from alignment.pipeline import run
from alignment.stages import rl

accelerator = Accelerator(cpu=True)


def update(recipe_path, overrides, out):
    recipe = load_recipe(recipe_path, [(p, v, raw) for raw in overrides for _, p, v in [parse_override(raw)]])
    m = rl.build_models(recipe, {"model": str(recipe.model), "reward_model": str(recipe.reward_model)}, print)
    rl.prepare_training(m, accelerator, recipe)
    params = [p for model in rl.trained_models(m) for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prompts, rendered, *_ = rl.load_prompts(recipe, m.tok)
    G, n = recipe.rl.group_size, 8 // accelerator.num_processes
    records = []
    for it in range(2):
        mine = [i for i in range(it * 8 // G, (it + 1) * 8 // G) for _ in range(G)]
        torch.manual_seed(it)  # the same global batch in every process; each then keeps its share
        r = rl.rollout(m, accelerator, [rendered[i] for i in mine], [prompts[i] for i in mine], recipe,
                        {"generation": 0.0, "scoring": 0.0})
        r = r.rows(slice(accelerator.process_index * n, (accelerator.process_index + 1) * n))
        stats, kl, returns, per_reply = rl.learn(m, accelerator, optimizer, scheduler, r, 0.05, recipe, it)
        records.append({**stats, **rl.iteration_metrics(accelerator, m, r, kl, returns, per_reply, 0.05, recipe.rl)})
    sharded = accelerator.num_processes > 1
    state = sharding.full_state_dict(m.policy) if sharded else m.policy.state_dict()
    held = sharding.summary(accelerator, rl.trained_models(m), [m.reference, m.rewards.reward_model], optimizer)
    if accelerator.is_main_process:
        torch.save({"state": state, "records": records, "held": held}, out)


def killed(recipe_path, overrides, after):
    metrics = rl.iteration_metrics

    def stop(*args, **kwargs):
        stop.calls += 1
        if stop.calls > after:
            raise KeyboardInterrupt  # every process at the same point, as a kill of the whole launch
        return metrics(*args, **kwargs)

    stop.calls = 0
    rl.iteration_metrics = stop
    try:
        run(recipe_path, overrides)
    except KeyboardInterrupt:
        pass
    finally:
        rl.iteration_metrics = metrics
    run(recipe_path, overrides)


for kind, name, recipe_path, overrides, *extra in json.loads(sys.argv[1]):
    if kind == "update":
        update(recipe_path, overrides, extra[0])
    elif kind == "stage":
        run(recipe_path, overrides)
    else:
        killed(recipe_path, overrides, extra[0])
if torch.distributed.is_initialized():  # leaving with the group open can abort the process at exit
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
"""

UPDATES = {  # the loop's two ways of rollout from a sharded policy, both
    "ppo": ("ppo", []),
    "grpo": ("grpo", []),
    "grpo, layer gather": ("grpo", ["grpo.generation_gather=layer"]),
}


# A reward under which the two processes need different numbers of dynamic-sampling rounds: process 0's
# first batch scores all equal (every group dropped), every other batch alternates 0, 1 (every group of 2
# informative).
UNEVEN_REWARD = """
import os

calls = []


def score(completions, **kwargs):
    calls.append(len(completions))
    if os.environ.get("RANK") == "0" and len(calls) == 1:
        return [0.0] * len(completions)
    return [float(i % 2) for i in range(len(completions))]
"""


def update_cases(tmp_path, tiny_base, reward_dir, procs):
    return [["update", name, str(RECIPES / f"{stage}.yaml"),
             [f"model={tiny_base}", f"reward_model={reward_dir}", *MICRO_RL[stage], f"{stage}.batch_size=8",
              f"{stage}.num_minibatches=1", "training.gradient_accumulation_steps=2", *extra],
             str(tmp_path / f"{name}-{procs}.pt")] for name, (stage, extra) in UPDATES.items()]


def stage_args(tiny_base, reward_dir, stage, out, *extra):
    return [f"model={tiny_base}", f"reward_model={reward_dir}", *MICRO_RL[stage], f"{stage}.total_episodes=32",
            *extra, f"output_dir={out}"]


def launch(tmp_path, cases):
    script = tmp_path / "fsdp_cases.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    done = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--multi_gpu", str(script), json.dumps(cases)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_fsdp2_rl_stages_train_like_one_process(tmp_path, tiny_base, reward_dir, monkeypatch):
    """Two FSDP2 processes (gloo): two iterations of ppo and grpo (both ways of generating) end with the
    weights and metrics of one process; each process holds about half of the trained parameters, of the
    optimizer's states and of the frozen models; the stages run by the pipeline record how they trained
    and save a full Hugging Face directory; grpo with LoRA trains its adapters over a sharded base; grpo
    with dynamic sampling runs when one process needs more rounds than the other (every process samples each
    round: a forward is collective)."""
    stage = ["stage", "ppo", str(RECIPES / "ppo.yaml"), stage_args(tiny_base, reward_dir, "ppo", tmp_path / "ppo")]
    lora = ["stage", "grpo lora", str(RECIPES / "grpo.yaml"),
            stage_args(tiny_base, reward_dir, "grpo", tmp_path / "lora", "lora={r: 4}", "training.learning_rate=0.05")]
    (tmp_path / "uneven.py").write_text(UNEVEN_REWARD)
    dynamic = ["stage", "grpo dynamic sampling", str(RECIPES / "grpo.yaml"),
               stage_args(tiny_base, "null", "grpo", tmp_path / "dynamic", "grpo.dynamic_sampling=true",
                          f"reward_fn={tmp_path / 'uneven.py'}:score")]
    done = launch(tmp_path, [*update_cases(tmp_path, tiny_base, reward_dir, 2), stage, lora, dynamic])
    assert "the RL stages shard their models with FSDP2 themselves" in done.stdout  # the runner's note, not DDP's

    script = tmp_path / "fsdp_cases.py"
    monkeypatch.setattr(sys, "argv", [str(script), json.dumps(update_cases(tmp_path, tiny_base, reward_dir, 1))])
    exec(compile(SCRIPT, str(script), "exec"), {})  # one process: this one, unsharded
    start = load_file(Path(tiny_base) / "model.safetensors")
    for name in UPDATES:
        one, two = (torch.load(tmp_path / f"{name}-{procs}.pt", weights_only=True) for procs in (1, 2))
        assert one["state"].keys() == two["state"].keys()
        moved = max((one["state"][k] - start[k]).abs().max().item() for k in start if k in one["state"])
        assert moved > 1e-4, name  # the updates did something
        for k in one["state"]:
            assert torch.allclose(one["state"][k], two["state"][k], atol=1e-5, rtol=1e-4), (name, k)
        for it, (a, b) in enumerate(zip(one["records"], two["records"])):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (name, it, k)
        assert one["held"]["distributed"] == "single" and two["held"]["distributed"] == "fsdp2"
        for what in ("trained_parameter_bytes_per_process", "frozen_parameter_bytes_per_process"):
            assert 0.45 < two["held"][what] / one["held"][what] < 0.55, (name, what)

    summary = json.loads((tmp_path / "ppo" / "run_info.json").read_text())["summary"]
    assert summary["distributed"] == "fsdp2" and summary["processes"] == 2
    full = sum(t.numel() * 4 for t in start.values())  # the policy (tied embeddings: saved once)
    # the policy and the critic (the reward model's shape, within a head) trained: half of both per process
    assert 0.45 * 2 * full < summary["trained_parameter_bytes_per_process"] < 0.55 * 2 * full + 1000
    assert summary["optimizer_state_bytes_per_process"] == 2 * summary["trained_parameter_bytes_per_process"]  # AdamW
    saved = load_file(tmp_path / "ppo" / "model.safetensors")
    assert saved.keys() == start.keys() and all(saved[k].shape == start[k].shape for k in start)
    assert max((saved[k] - start[k]).abs().max().item() for k in start) > 1e-4
    from alignment.models import load_causal_lm, load_tokenizer

    load_causal_lm(str(tmp_path / "ppo"), load_tokenizer(str(tmp_path / "ppo")))  # loads as any stage output

    lora_summary = json.loads((tmp_path / "lora" / "run_info.json").read_text())["summary"]
    assert lora_summary["distributed"] == "fsdp2"
    assert lora_summary["trained_parameter_bytes_per_process"] < lora_summary["frozen_parameter_bytes_per_process"] / 4
    merged = load_file(tmp_path / "lora" / "model.safetensors")
    assert merged.keys() == start.keys()  # merged into the base: no adapter weights left
    assert max((merged[k] - start[k]).abs().max().item() for k in start) > 1e-5  # the adapters trained
    # process 0 needed a second round in the first iteration, process 1 did not (and sampled with it, since a
    # sharded forward is collective: had it skipped the round, process 0 would have waited for it forever)
    logged = [json.loads(line) for line in (tmp_path / "dynamic" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in logged if "step" in row]
    assert [row["dynamic_sampling/rounds"] for row in logged] == [2, 1, 1, 1]
    first = logged[0]  # 2 groups per process: process 0's first 2 dropped, then 2 more; process 1's 2 kept
    assert (first["dynamic_sampling/sampled_groups"], first["dynamic_sampling/dropped_groups"]) == (6, 2)
    assert first["dynamic_sampling/topped_up"] == 0


def test_fsdp2_killed_run_resumes_to_the_same_weights(tmp_path, tiny_base, reward_dir):
    """A sharded checkpoint (torch.distributed.checkpoint) every 2 iterations; a run stopped in both
    processes after its third iteration resumes from checkpoint-2 and ends with the weights of a run
    that was never stopped."""
    args = lambda out: stage_args(tiny_base, reward_dir, "grpo", tmp_path / out, "training.save_steps=2")  # noqa: E731
    recipe = str(RECIPES / "grpo.yaml")
    launch(tmp_path, [["stage", "straight", recipe, args("straight")], ["killed", "killed", recipe, args("killed"), 3]])
    summary = json.loads((tmp_path / "killed" / "run_info.json").read_text())["summary"]
    assert summary["resumed_from"] == "checkpoint-2" and summary["iterations"] == 4
    logged = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "step" in row] == [1, 2, 3, 4]
    a, b = (load_file(tmp_path / out / "model.safetensors") for out in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
