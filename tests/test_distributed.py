"""Scale-out on torch.distributed (gloo, 2 processes): FSDP2 matches one process step for step, the
load-balancing loss comes from all-reduced counts, and `dbrx train --nproc 2` runs a YAML end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from dbrx.parallel import parallel_config
from dbrx.train.config import ConfigError, load_config
from dbrx.config import DbrxConfig
from tests.test_train import data, run_config  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend")


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("layout", [
    {},
    {"fsdp_config": {"sharding_strategy": "SHARD_GRAD_OP", "activation_checkpointing": True}},
    {"parallelism": {"expert_parallel_degree": 2}},
    {"parallelism": {"expert_parallel_degree": 2}, "pretrained": True},
    {"parallelism": {"expert_parallel_degree": 2}, "pretrained": True, "lora": True},
], ids=["fsdp2", "shard-grad-op+checkpointing", "ep2+fsdp2", "ep2+fsdp2-from-a-bf16-checkpoint",
        "lora-ep2+fsdp2-from-a-bf16-checkpoint"])
def test_fsdp2_and_ep_match_one_process_and_the_per_rank_balance_would_not(data, tmp_path, layout):
    layout = dict(layout)
    lora = layout.pop("lora", False)
    threshold = 0.02 if lora else 0.5  # active: the norms are ~1-2 (the adapters' alone, ~0.07)
    clip = {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": threshold}}
    common = dict(save_folder=None, eval_loader=None, algorithms=clip, max_duration="8ba")
    if layout.pop("pretrained", False):  # a bf16 checkpoint that each rank reads its own pieces of
        import torch

        from dbrx import DbrxForCausalLM
        from tests.test_train import TINY_MODEL

        torch.manual_seed(5)
        spec = {k: v for k, v in TINY_MODEL.items() if k != "preset"}
        model = DbrxForCausalLM(DbrxConfig.from_name("dbrx-tiny").replace(**spec)).to(torch.bfloat16)
        model.save_pretrained(tmp_path / "ckpt")
        common["model"] = {"pretrained": str(tmp_path / "ckpt")}
        if lora:  # adapters on attention and on the experts (split by expert over EP), the base frozen
            common["model"]["peft_config"] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                              "target_modules": ["Wqkv", "out_proj", "experts"]}
            common["optimizer"] = {"name": "decoupled_adamw", "lr": 1e-2}  # adapters move visibly in 8 steps
    ref = write_yaml(tmp_path / "ref.yaml", run_config(data, tmp_path, device_train_microbatch_size=8, **common))
    par = write_yaml(tmp_path / "par.yaml", run_config(data, tmp_path, device_train_microbatch_size=4,
                                                       **layout, **common))
    out = tmp_path / "out.json"
    export = [str(tmp_path / "export")] if lora else []
    done = torchrun("tests/distributed_worker.py", str(ref), str(par), str(out), "8", *export)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["world_size"] == 2 and len(rows) == 8
    # Each rank holds half of every expert tensor's rows: FSDP2 shards (dim 0), or with EP 2 whole experts
    assert result["expert_rows"][1] == result["expert_rows"][0] // 2
    for row in rows:
        assert abs(row["loss"][0] - row["loss"][1]) < 1e-5
        assert abs(row["lb"][0] - row["lb"][1]) < 1e-5
        assert abs(row["norm"][0] - row["norm"][1]) <= 1e-6 * row["norm"][0]
        assert row["norm"][0] > threshold  # clipping was active, with the global norm
    assert rows[0]["grad_rel"] < 1e-6
    assert result["weight_rel"] < 1e-4  # Adam divides by sqrt(v): rounding-level gradient differences grow a little
    # Negative control: balancing each rank's own tokens gives another loss.
    assert max(abs(r["per_rank_lb"] - r["lb"][0]) for r in rows) > 1e-4
    if lora:  # the export from shards (merged weights, and the adapters) equals one process's of the same weights
        import torch
        from safetensors.torch import load_file

        from dbrx import DbrxForCausalLM

        par_dir, ref_dir = tmp_path / "export" / "par", tmp_path / "export" / "ref"
        merged = DbrxForCausalLM.from_pretrained(par_dir / "hf").state_dict()
        for name, t in DbrxForCausalLM.from_pretrained(ref_dir / "hf").state_dict().items():
            assert torch.equal(t, merged[name]), name
        base = load_file(tmp_path / "ckpt" / "model.safetensors")
        assert not torch.equal(merged["transformer.blocks.0.ffn.experts.mlp.w1"],
                               base["transformer.blocks.0.ffn.experts.mlp.w1"])  # the experts' adapters trained
        adapters = load_file(par_dir / "adapter" / "adapter_model.safetensors")
        assert adapters.keys() == load_file(ref_dir / "adapter" / "adapter_model.safetensors").keys()
        for name, t in load_file(ref_dir / "adapter" / "adapter_model.safetensors").items():
            assert torch.equal(t, adapters[name]), name


def test_dbrx_train_nproc_2_runs_a_yaml(data, tmp_path):
    # bf16 gathers with fp32 reduction, gradient accumulation over 2 micro-batches per rank; Foundry's icl_tasks
    # (multiple choice and generation) at each evaluation, every rank running the same forwards of the sharded model
    fsdp = {"mixed_precision": "DEFAULT", "activation_checkpointing": True}
    rows = [{"query": f"Item {i}: pick one.", "choices": ["red", "green blue"], "gold": i % 2} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"context": f"Q: {i} plus one?\nA:", "answer": str(i + 1), "aliases": [str(i + 1)]} for i in range(5)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = [{"label": "colors", "dataset_uri": str(tmp_path / "mc.jsonl"), "icl_task_type": "multiple_choice",
              "num_fewshot": [0]},
             {"label": "plus", "dataset_uri": str(tmp_path / "gen.jsonl"), "num_fewshot": [1],
              "icl_task_type": "generation_task_with_answers", "early_stopping_criteria": ["\n"]}]
    model = dict(run_config(data, tmp_path)["model"], vocab_size=100352)  # the eval prompts are cl100k text
    save = tmp_path / "run"
    run = run_config(data, save, max_duration="4ba", eval_interval="2ba", save_interval="4ba",
                     device_train_microbatch_size=2, fsdp_config=fsdp, model=model, icl_tasks=tasks)
    cfg = write_yaml(tmp_path / "run.yaml", run)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "dbrx", "train", str(cfg), "--nproc", "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("done: 4 steps") == 1  # printed by rank 0 only
    assert "2 processes (gloo): FSDP2 over 2 ranks" in done.stdout
    assert "held-out loss" in done.stdout
    logged = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    icl = [r for r in logged if "metrics/plus/1-shot/InContextLearningGenerationExactMatchAccuracy" in r]
    assert [r["step"] for r in icl] == [2, 4]  # once per evaluation: rank 0 writes
    assert all(0 <= r["metrics/colors/0-shot/InContextLearningMultipleChoiceAccuracy"] <= 1 for r in icl)
    # a mistake in the run's configuration: each rank says what it is, and the launcher adds no traceback
    bad = write_yaml(tmp_path / "bad.yaml", dict(run, icl_tasks=[dict(tasks[0], num_fewshots=[0])]))
    done = subprocess.run([sys.executable, "-m", "dbrx", "train", str(bad), "--nproc", "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "unknown key 'num_fewshots'" in done.stderr and "Traceback" not in done.stderr, done.stderr[-4000:]


def test_parallel_keys_are_checked_and_named():
    cfg = {"parallelism": {"expert_parallel_degree": 3}}
    with pytest.raises(ConfigError, match="parallelism.expert_parallel_degree: 3 must divide the expert count"):
        parallel_config(cfg, 2, 16)
    with pytest.raises(ConfigError, match="disagree"):
        parallel_config({"parallelism": {"expert_parallel_degree": 2},
                         "model": {"ffn_config": {"moe_world_size": 4}}}, 4, 16)
    with pytest.raises(ConfigError, match="fsdp_config.sharding_strategy: NO_SHARD"):
        parallel_config({"fsdp_config": {"sharding_strategy": "NO_SHARD"}}, 2, 16)
    with pytest.raises(ConfigError, match="fsdp_config.mixed_precision"):
        parallel_config({"fsdp_config": {"mixed_precision": "HALF"}}, 2, 16)
    with pytest.raises(ConfigError, match="parallelism.tensor_parallel_degree"):
        parallel_config({"parallelism": {"tensor_parallel_degree": 2}}, 2, 16)
    with pytest.raises(ConfigError, match="data_parallel_shard_degree: 3"):
        parallel_config({"parallelism": {"data_parallel_shard_degree": 3}}, 2, 16)
    notes = []
    pc = parallel_config({"fsdp_config": {"sharding_strategy": "SHARD_GRAD_OP", "mixed_precision": "DEFAULT",
                                          "activation_checkpointing": True, "limit_all_gathers": True}},
                         2, 16, log=notes.append)
    assert (pc.dp_shard, pc.reshard_after_forward, pc.activation_checkpointing) == (2, False, True)
    assert "limit_all_gathers" in notes[0]
    with pytest.raises(ConfigError, match="unknown key 'fsdp_config.shardng_strategy'"):
        load_config(None, base={"fsdp_config": {"shardng_strategy": "FULL_SHARD"}})


def _losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _train(cfg_path: Path, nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "dbrx", "train", str(cfg_path)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_sharded_checkpoints_resume_at_another_layout_and_export_from_shards(data, tmp_path):
    import shutil

    import torch

    from dbrx import DbrxForCausalLM
    from dbrx.train.trainer import Trainer

    def config(name: str, micro: int, **extra) -> Path:
        cfg = run_config(data, tmp_path / name, device_train_microbatch_size=micro, eval_loader=None,
                         save_interval="4ba", max_duration="8ba", autoresume=True, **extra)
        return write_yaml(tmp_path / f"{name}.yaml", cfg)

    _train(config("whole", 8), 1)  # uninterrupted, one process
    whole = _losses(tmp_path / "whole")
    # 2 processes with expert parallelism -> 1 process: the sharded checkpoint at step 4 resumes in one process
    _train(config("two", 4, parallelism={"expert_parallel_degree": 2}), 2)
    two = tmp_path / "two"
    assert (two / "checkpoints" / "ba00000008" / ".metadata").exists()  # Distributed Checkpoint shards
    hf = two / "hf"
    assert len(list(hf.glob("model-0000?-of-00002.safetensors"))) == 2 and (hf / "model.safetensors.index.json").exists()
    # The export from shards holds the sharded run's final weights, exactly.
    probe = Trainer(load_config(config("two", 8)), log=lambda *a, **k: None)
    probe.load_checkpoint(two / "checkpoints" / "ba00000008")
    exported = DbrxForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for (name, a), b in zip(probe.model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    for step in (1, 4, 8):
        assert abs(_losses(two)[step] - whole[step]) < 1e-5
    shutil.rmtree(two / "checkpoints" / "ba00000008")
    _train(config("two", 8), 1)
    resumed = _losses(two)
    assert all(abs(resumed[s] - whole[s]) < 1e-5 for s in range(5, 9)), (resumed, whole)
    # 1 process -> 2
    one = tmp_path / "whole"
    shutil.rmtree(one / "checkpoints" / "ba00000008")
    _train(config("whole", 4), 2)
    resumed = _losses(one)
    assert all(abs(resumed[s] - whole[s]) < 1e-5 for s in range(5, 9)), (resumed, whole)


def test_lora_fine_tuning_on_two_processes_resumes_in_one(data, tmp_path):
    """LoRA fine-tuning (LLM Foundry's finetuning loader on JSONL prompt/response rows) with expert parallelism
    from a pretrained checkpoint: the DCP checkpoint (adapters and their AdamW state; the frozen base) resumes in one
    process, and its later losses equal the uninterrupted sharded run's."""
    import shutil

    import torch

    from dbrx import DbrxForCausalLM

    torch.manual_seed(5)
    DbrxForCausalLM(DbrxConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=100352,
                               attn_config={"kv_n_heads": 1}, ffn_config={"ffn_hidden_size": 16})
                    ).save_pretrained(tmp_path / "ckpt")
    rows = [{"prompt": f"What is {a} plus {b}? ", "response": f"{a} plus {b} is {a + b}."}
            for a in range(8) for b in range(8)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"pretrained": str(tmp_path / "ckpt"),
             "peft_config": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["Wqkv", "experts"]}}
    loader = {"name": "finetuning", "dataset": {"hf_name": "json", "split": "train", "shuffle": True,
                                                "hf_kwargs": {"data_files": {"train": str(tmp_path / "sft.jsonl")}}}}

    def config(micro: int, **extra) -> Path:
        cfg = run_config(data, tmp_path / "run", model=model, train_loader=loader, eval_loader=None,
                         device_train_microbatch_size=micro, save_interval="4ba", max_duration="8ba", autoresume=True,
                         max_seq_len=32, optimizer={"name": "decoupled_adamw", "lr": 1e-2}, **extra)
        return write_yaml(tmp_path / f"lora{micro}.yaml", cfg)

    _train(config(4, parallelism={"expert_parallel_degree": 2}), 2)
    run = tmp_path / "run"
    uninterrupted = _losses(run)
    assert (run / "checkpoints" / "ba00000004" / ".metadata").exists() and (run / "adapter").exists()
    shutil.rmtree(run / "checkpoints" / "ba00000008")
    _train(config(8), 1)
    resumed = _losses(run)
    assert resumed[8] != resumed[1] and all(abs(resumed[s] - uninterrupted[s]) < 1e-5 for s in range(5, 9)), \
        (resumed, uninterrupted)


def test_the_memory_plan_matches_the_published_layouts_and_refuses_a_run_that_cannot_fit(data, tmp_path, capsys):
    from dbrx.cli import main
    from dbrx.config import DbrxConfig
    from dbrx.parallel.plan import memory_plan
    from dbrx.train.trainer import Trainer

    base = DbrxConfig.from_name("dbrx-base")
    eight = memory_plan(base, 8, device_bytes=80e9)
    wide = memory_plan(base, 64, 16, activation_checkpointing=True, device_bytes=80e9)
    assert not eight.fits and 250e9 < eight.total and eight.optimizer == 2 * eight.parameters
    assert wide.fits and 35e9 < wide.total < 50e9
    assert main(["plan", "--preset", "dbrx-base", "--nproc", "64", "--ep", "16", "--gpu-memory", "80GB",
                 "--activation-checkpointing"]) == 0
    assert "fits in 80 GB per device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--preset", "dbrx-base", "--nproc", "8", "--gpu-memory", "80GB"])
    assert "does NOT fit" in capsys.readouterr().out
    # The trainer refuses from the plan, before it builds (allocates) the 132B model.
    cfg = run_config(data, tmp_path, save_folder=None, model={"preset": "dbrx-base"}, max_seq_len=32)
    with pytest.raises(ConfigError, match="needs about .* GB per device"):
        Trainer(load_config(None, base=cfg), log=lambda *a: None)


def test_a_two_node_rendezvous_on_loopback_trains(data, tmp_path):
    """Two "nodes" (one process each) meet through torchrun's c10d rendezvous on 127.0.0.1, as two machines
    would through a head node's address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_yaml(tmp_path / "run.yaml", run_config(data, tmp_path, save_folder=None, max_duration="2ba",
                                                       eval_loader=None))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=dbrx-test", "-m", "dbrx", "train", str(cfg)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [node.communicate(timeout=240) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-4000:]
    printed = outs[0][0] + outs[1][0]
    assert printed.count("done: 2 steps") == 1 and "2 processes (gloo)" in printed


def test_sigkill_of_one_rank_during_a_save_leaves_the_previous_checkpoint_usable(data, tmp_path):
    def config(name: str) -> Path:
        return write_yaml(tmp_path / f"{name}.yaml", run_config(
            data, tmp_path / name, device_train_microbatch_size=8, eval_loader=None, save_interval="2ba",
            max_duration="6ba", autoresume=True, dist_timeout=30))

    _train(config("straight"), 1)
    killed = config("killed")
    done = torchrun("tests/distributed_kill_worker.py", str(killed), "4")
    assert done.returncode != 0  # rank 1 died; torchrun stopped rank 0 too
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "ba00000002" / "trainer_state.json").exists()
    assert not (checkpoints / "ba00000004").exists()  # the interrupted save never became a checkpoint
    assert (checkpoints / ".ba00000004.tmp").exists()
    out = _train(killed, 1).stdout
    assert "resumed from" in out and "ba00000002" in out
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert all(abs(straight[s] - resumed[s]) < 1e-5 for s in range(3, 7)), (straight, resumed)
