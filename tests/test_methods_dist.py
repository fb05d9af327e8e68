"""Methods across two gloo ranks: TAID's ``t`` stays identical on every rank (its loss is all-reduced
before the update), and DiverseDistill under DistributedDataParallel keeps its training-only
parameters identical when the committee path runs only on some steps (``committee_every``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from appdistill.methods import METHODS
from appdistill.methods.taid import TAIDSchedule
from appdistill.student.model import OverArch, StudentOutput
from tests.test_methods import COMMITTEE, make_batch

# each rank's own training loss per step: the ranks disagree, so a rank-local update would diverge
LOSSES = [[1.0, 0.8, 0.9, 0.5, 0.5, 0.2], [0.6, 0.9, 0.4, 0.7, 0.1, 0.3]]
TOTAL = 10**6  # the linear floor stays near t_start: t moves by the adaptive, loss-driven update
ALPHA = 0.05   # a visible step per update (paper: 5e-4)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        taid = METHODS.build("taid", {"teacher": "dlrm", "t_start": 0.4, "alpha": ALPHA}, committee=COMMITTEE)
        ts = []
        for k, loss in enumerate(LOSSES[rank]):
            taid.on_step_end(torch.tensor(loss), k, TOTAL)
            ts.append(taid.schedule.t)

        torch.manual_seed(0)  # the same initial method weights on both ranks, as train() seeds them
        dd = METHODS.build("diverse_distill", {"committee_path": {"d_e": 8, "top_k": 2, "every": 2, "grad": 0.0,
                                                                  "lambda_kd": 0.0}, "kd_weights": "soft"},
                           committee=COMMITTEE, student_dim=5)
        init_params = torch.cat([p.detach().flatten() for p in dd.parameters()]).clone()
        ddp = nn.parallel.DistributedDataParallel(dd, find_unused_parameters=True)
        opt = torch.optim.Adam([p for p in dd.parameters() if p.requires_grad], lr=1e-2)
        model = nn.Module()
        model.over_arch = OverArch(5, [4])
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        terms_seen = []
        for _ in range(5):
            h = torch.randn(4, 5, generator=g, requires_grad=True)
            terms = ddp(StudentOutput(h.sum(1), h), make_batch(), model)
            terms_seen.append(sorted(terms))
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in dd.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "t": ts, "terms": terms_seen, "answer_calls": sum(dd.answer_calls.values()),
            "max_param_diff": float((gathered[0] - gathered[1]).abs().max()),
            "moved": float((flat - init_params).abs().max())}))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_share_taid_t_and_diverse_distill_weights(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # t is identical on both ranks and follows the *mean* loss, computed here in one process
    assert r0["t"] == r1["t"]
    s = TAIDSchedule(0.4, 1.0, ALPHA)
    want = [s.update(sum(ls) / 2, k, TOTAL) for k, ls in enumerate(zip(*LOSSES))]
    assert r0["t"] == pytest.approx(want, abs=1e-7)  # the all-reduce sums float32 losses
    s = TAIDSchedule(0.4, 1.0, ALPHA)
    local = [s.update(x, k, TOTAL) for k, x in enumerate(LOSSES[0])]  # what rank 0 alone would do
    assert max(abs(a - b) for a, b in zip(r0["t"], local)) > 1e-5  # 100x the tolerance above
    # committee steps 0, 2, 4 answer (4 rows x top-2); steps 1, 3 only distil, with no DDP parameter in the graph
    assert [("bce_committee" in t) for t in r0["terms"]] == [True, False, True, False, True]
    assert r0["answer_calls"] == r1["answer_calls"] == 3 * 4 * 2
    assert r0["max_param_diff"] == 0.0 and r0["moved"] > 0  # trained, and identical across ranks
