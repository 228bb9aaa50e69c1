"""Run by torchrun from tests/test_distributed.py: the same training steps in one process (in this rank, unsharded)
and sharded over the job (FSDP2), on the same global batches. Rank 0 writes what it measured as JSON.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py REF.yaml PAR.yaml OUT.json STEPS [EXPORT_DIR]

With EXPORT_DIR, the sharded run then exports (EXPORT_DIR/par: hf from the shards, and the adapters with LoRA),
and the one-process trainer, given the sharded run's final weights, exports the same (EXPORT_DIR/ref)."""

import json
import sys

import torch

from dbrx.moe import load_balancing_loss
from dbrx.parallel import init_distributed
from dbrx.train.config import load_config
from dbrx.train.trainer import Trainer


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(ref_yaml: str, par_yaml: str, out: str, steps: int, export_dir: str | None = None) -> None:
    dist = init_distributed("cpu")
    ref = Trainer(load_config(ref_yaml), log=lambda *a, **k: None)
    par = Trainer(load_config(par_yaml), log=lambda *a, **k: None, dist=dist)
    rows = []
    for step in range(steps):
        batch = ref.loader.next_batch()
        assert torch.equal(batch["input_ids"], par.loader.next_batch()["input_ids"])
        r, p = ref.backward_batch(batch), par.backward_batch(batch)
        grad_rel, worst = max((((a.grad - full(b.grad)).abs().max() / a.grad.abs().max().clamp_min(1e-30)).item(), n)
                              for (n, a), b in zip(ref.model.named_parameters(), par.model.parameters())
                              if a.requires_grad)
        # The negative control: each rank balancing only its own tokens, averaged over ranks.
        f = par.model.config.ffn_config
        local = load_balancing_loss(p[2], f.moe_num_experts, f.moe_top_k).item()
        per_rank = dist.sum_floats(local)[0] / dist.world_size
        r_row, p_row = ref.apply_gradients(*r), par.apply_gradients(*p)
        rows.append({"loss": [r_row["loss"], p_row["loss"]], "lb": [r_row["lb_loss"], p_row["lb_loss"]],
                     "norm": [r_row["grad_norm"], p_row["grad_norm"]], "grad_rel": grad_rel, "worst": worst,
                     "per_rank_lb": per_rank})
    weight_rel = max(((a.detach() - full(b.detach())).abs().max() / a.detach().abs().max()).item()
                     for a, b in zip(ref.model.parameters(), par.model.parameters()))
    w1 = par.model.transformer.blocks[0].ffn.experts.mlp.w1
    local_rows = (w1.to_local() if hasattr(w1, "to_local") else w1).shape[0]
    if dist.is_main:
        with open(out, "w") as fh:
            json.dump({"rows": rows, "weight_rel": weight_rel, "world_size": dist.world_size,
                       "expert_rows": [w1.shape[0], local_rows]}, fh)
    if export_dir is not None:
        from pathlib import Path

        par.save_folder, ref.save_folder = Path(export_dir) / "par", Path(export_dir) / "ref"
        par.export_hf()
        weights = {k: full(v.detach()) for k, v in par.model.state_dict().items()}
        if dist.is_main:
            ref.model.load_state_dict(weights)
            ref.export_hf()
    dist.barrier()  # nobody tears the group down while another rank is still in a collective
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
