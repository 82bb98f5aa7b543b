"""FSDP against DDP on two real gloo processes: the same data gives the same training, evaluation
and checkpoint; a checkpoint reloaded into a fresh sharded model continues identically, and a DDP
checkpoint resumes under FSDP."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medisee.train.evaluate import load_eval_rows
from tests.conftest import free_port
from tests.train.batches import prepare_phantom, reader_batch, split_rows

pytestmark = pytest.mark.slow

WORLD = 2
MICRO_BATCHES = 2  # per step, so gradient-sync switching is exercised
STEPS = 2
FINETUNES = ("full", "lora")


@pytest.fixture(scope="module")
def phantom_shards(tmp_path_factory):
    return prepare_phantom(tmp_path_factory.mktemp("fsdp"), images=8, val_fraction=0.25)


def micro_batches(shards, sam_size: int, clip_size: int) -> list[list[list[dict]]]:
    """[rank][step * MICRO_BATCHES + m] -> reader batch. Rank 1's first micro-batch holds only false
    queries, so that rank runs no decoder while rank 0 does (the conditional path FSDP must join)."""
    rows = split_rows(shards, "train")
    with_target = [r for r in rows if r["box"] is not None]
    false = [r for r in rows if r["query_kind"] == "false_query"]
    assert len(with_target) >= 16 and len(false) >= 2
    per_rank = [[], []]
    for i in range(STEPS * MICRO_BATCHES):
        for rank in range(WORLD):
            if rank == 1 and i == 0:
                chosen = false[:2]
            else:
                start = (i * WORLD + rank) * 2
                chosen = with_target[start : start + 2]
            per_rank[rank].append(reader_batch(chosen, sam_size, clip_size))
    return per_rank


def train_steps(model, module, optimizer, batches, steps: int, offset: int = 0) -> None:
    from medisee.data.batch import collate
    from medisee.train.step import train_step

    model.train()
    for step in range(offset, offset + steps):
        micro = batches[step * MICRO_BATCHES : (step + 1) * MICRO_BATCHES]
        train_step(model, module, optimizer, None, [collate(b, module.text) for b in micro], grad_clip=1.0)


def build(strategy: str, finetune: str):
    from medisee.model import build_model
    from medisee.train import parallel

    module = build_model("tiny", finetune=finetune, seed=0)
    model = parallel.wrap(module, strategy, WORLD, torch.device("cpu"))
    params = [p for p in module.parameters() if p.requires_grad]
    return (
        model,
        module,
        torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=True),
    )


def worker(rank: int, port: int, batches, eval_rows, out: str) -> None:
    """Both strategies for each finetune mode, one after the other in the same process group (one
    spawn: starting processes costs more than the training here)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {}
        for finetune in FINETUNES:
            ddp = train_and_resume("ddp", finetune, batches[rank], eval_rows, rank)
            fsdp = train_and_resume("fsdp", finetune, batches[rank], eval_rows, rank, foreign=ddp["saved"])
            results[finetune] = {"ddp": ddp, "fsdp": fsdp}
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def train_and_resume(strategy: str, finetune: str, batches, eval_rows, rank: int, foreign=None) -> dict:
    """Rank 0's states (None on the others). Under FSDP a third model resumes from `foreign`, the DDP
    checkpoint (which only rank 0 holds, as only rank 0 reads a checkpoint under FSDP)."""
    from medisee.train import parallel
    from medisee.train.evaluate import evaluate_rows

    model, module, optimizer = build(strategy, finetune)  # seeds the RNGs: each run starts alike
    train_steps(model, module, optimizer, batches, STEPS - 1)
    # ranks evaluate different numbers of rows, and reasoning rows generate: no collectives allowed
    mine = eval_rows[rank::WORLD][: 3 if rank == 0 else 1]
    with parallel.full_parameters(model):
        metrics = evaluate_rows(module, mine, batch_size=2, reduce=True)
    saved = parallel.trainable_state(module, optimizer)

    # fresh models loaded from a checkpoint continue as the original: from this run's own one
    # exactly, and from the other strategy's one (equal to it within rounding)
    resumes = [resume_from(saved, strategy, finetune, rank)]
    if strategy == "fsdp":
        resumes.append(resume_from(foreign, strategy, finetune, rank))
    states = []
    for m, mod, opt in [(model, module, optimizer), *resumes]:
        torch.manual_seed(7 + rank)  # the same LoRA dropout masks (the recipe restores RNG state)
        train_steps(m, mod, opt, batches, 1, offset=STEPS - 1)
        states.append(parallel.trainable_state(mod, opt))
    final, resumed, *crossed = states
    result = {"metrics": metrics, "saved": saved, "final": final, "resumed": resumed}
    return result | ({"crossed": crossed[0]} if crossed else {})


def resume_from(checkpoint, strategy: str, finetune: str, rank: int):
    """A fresh model loaded the way the recipe does: under FSDP only rank 0 holds the checkpoint.
    (A copy: the loaded optimiser keeps the tensors it is given, and `checkpoint` is compared later.)"""
    from medisee.train import parallel

    model, module, optimizer = build(strategy, finetune)
    weights, optim = copy.deepcopy(checkpoint) if rank == 0 else (None, None)
    assert parallel.reads_checkpoint(model) == (rank == 0 or strategy == "ddp")
    if strategy == "ddp":  # every rank loads its own whole copy; under FSDP rank 0 broadcasts
        weights, optim = _broadcast((weights, optim))
    parallel.load_trainable_state(module, optimizer, weights, optim, "test")
    return model, module, optimizer


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@pytest.fixture(scope="module")
def runs(phantom_shards, tmp_path_factory) -> dict:
    """{finetune: {strategy: rank 0's metrics and states}} from one spawn of WORLD gloo processes."""
    from medisee.model import build_model

    probe = build_model("tiny", seed=0)
    batches = micro_batches(phantom_shards, probe.sam_size, probe.clip_size)
    eval_rows = load_eval_rows(str(phantom_shards), "val", None, limit=6)
    assert any(r["query_kind"].startswith("reasoning") for r in eval_rows)
    out = tmp_path_factory.mktemp("fsdp-runs") / "results.pt"
    mp.spawn(worker, args=(free_port(), batches, eval_rows, str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


def assert_close_dicts(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), k


def assert_same_state(a, b, atol: float) -> None:
    (wa, oa), (wb, ob) = a, b
    assert_close_dicts(wa, wb, atol)
    for name in oa["state"].keys() | ob["state"].keys():
        assert name in wa
        if name not in oa["state"] or name not in ob["state"]:
            # never used by any loss (SAM's IoU head): FSDP steps it with zero gradients, DDP not at all
            only = oa["state"].get(name) or ob["state"][name]
            assert not only["exp_avg"].any() and not only["exp_avg_sq"].any(), name
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = oa["state"][name][key], ob["state"][name][key]
            assert torch.allclose(x, y, atol=atol, rtol=1e-4), (name, key, (x - y).abs().max(), y.abs().max())


@pytest.mark.parametrize("finetune", FINETUNES)
def test_fsdp_matches_ddp_and_resumes_exactly(runs, finetune):
    ddp, fsdp = runs[finetune]["ddp"], runs[finetune]["fsdp"]
    trained = set(ddp["saved"][0])
    assert "sam.mask_decoder.iou_token.weight" in trained and "seg_router.gate.0.weight" in trained
    assert not any(k.startswith("sam.image_encoder") for k in trained)  # frozen towers stay out
    assert_same_state(fsdp["saved"], ddp["saved"], atol=1e-5)
    assert fsdp["metrics"] == pytest.approx(ddp["metrics"], abs=1e-4)
    assert np.isfinite(list(fsdp["metrics"].values())).all()
    # the rank whose first batch had no target still stepped the decoder side identically
    assert_same_state(fsdp["final"], ddp["final"], atol=1e-5)
    # a sharded model loaded from the full checkpoint continues bit-for-bit like the original
    assert_same_state(fsdp["resumed"], fsdp["final"], atol=0)
    assert_same_state(ddp["resumed"], ddp["final"], atol=0)
    # a DDP checkpoint resumes under FSDP
    assert_same_state(fsdp["crossed"], fsdp["final"], atol=1e-5)
