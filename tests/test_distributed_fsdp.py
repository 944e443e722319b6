"""FSDP2 fine-tuning (llama_port.distributed.fsdp) against one process, on 2 gloo ranks.

The single process trains on a 2-row batch. Sharded, each rank takes either one row of it ("split":
data parallelism; both rows have the same number of labelled tokens, so the mean of the ranks'
losses is the batch's loss and FSDP2's averaged gradients are its gradients, up to the order of the
float sums) or the whole batch ("same": every sum is the single process's, so it is comparable
exactly). Compared: the loss and the loss after one SGD step (plain, with gradient checkpointing,
tied embeddings); the checkpoint the sharded model saves, read by transformers' from_pretrained,
against the sharded model itself (exact: the save loses nothing) and against the single-process
model after the same step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import IDS, hf_load, logits_of, make_hf_model, make_port_model, report_max_diff, run_ranks, tiny_config_dict

import llama_port
from llama_port.distributed import save_full_checkpoint, shard_model

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.1
WORLD_SIZE = 2
# name: (config overrides, gradient checkpointing, reshard_after_forward, how the sharded model saves, rows)
SCENARIOS = {
    "plain": ({}, False, True, "save_full_checkpoint", "split"),
    "checkpointing": ({}, True, False, "save_pretrained", "same"),
    "tied_checkpointing": ({"tie_word_embeddings": True}, True, True, "save_pretrained", "split"),
}
# The saved checkpoint's logits against the single-process model's after the step: exact sums, or
# the ranks' gradients averaged in another order than one process sums them (measured 1.3e-6).
SINGLE_PROCESS_ATOL = {"same": 1e-6, "split": 1e-5}


def _model(overrides: dict, checkpointing: bool) -> llama_port.LlamaForCausalLM:
    """The same tiny random model on every rank and in the test process (seeded), in training mode."""
    model = make_port_model(make_hf_model(tiny_config_dict(**overrides)))
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def _one_sgd_step(model, ids: torch.Tensor) -> tuple[float, float]:
    """(loss, loss after one SGD step on it) of ``model`` on ``ids`` (B, T), labels = ids."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), model(ids, labels=ids).loss.item()


def _fsdp_worker(rank: int, world_size: int, scenario: str, folder: str) -> dict:
    """Shard, train one step on this rank's row, check the layout, save collectively."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from llama_port.checkpoints.saving import save_pretrained

    overrides, checkpointing, reshard, save_via, rows = SCENARIOS[scenario]
    model = shard_model(_model(overrides, checkpointing), reshard_after_forward=reshard)
    layout = {
        "units": [isinstance(m, FSDPModule) for m in [model, *model.model.layers]],
        "all_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "local_rows": model.model.embed_tokens.weight.to_local().shape[0],
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
    }
    losses = _one_sgd_step(model, IDS[rank : rank + 1] if rows == "split" else IDS)
    with pytest.raises(ValueError, match="DTensors"):  # one rank's shards are never written as a checkpoint
        save_pretrained(model, f"{folder}-refused")
    if save_via == "save_pretrained":
        model.save_pretrained(folder)
    else:
        save_full_checkpoint(model, folder)
    return {
        "losses": losses, "layout": layout, "logits": logits_of(model.eval()),
        "saved": (Path(folder) / "model.safetensors").is_file(),
    }


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fsdp_step_matches_single_process(scenario, tmp_path):
    overrides, checkpointing, _, _, rows = SCENARIOS[scenario]
    folder = tmp_path / "saved"
    results = run_ranks(_fsdp_worker, WORLD_SIZE, scenario, str(folder), timeout=120)

    single = _model(overrides, checkpointing)
    loss, loss_after = _one_sgd_step(single, IDS)
    sharded = torch.tensor([r["losses"] for r in results]).mean(dim=0)  # split: the rows have equal token counts
    tied = bool(overrides.get("tie_word_embeddings"))
    for r in results:
        assert r["layout"] == {"units": [True] * 3, "all_dtensors": True, "local_rows": 128 // WORLD_SIZE, "tied": tied}
        assert r["saved"]  # every rank returns only once rank 0's folder is complete
    assert report_max_diff(f"{scenario} loss", abs(sharded[0].item() - loss)) <= 1e-5
    assert report_max_diff(f"{scenario} loss after one SGD step", abs(sharded[1].item() - loss_after)) <= 1e-5
    assert loss_after < loss

    hf = hf_load(folder)
    assert hf.config.tie_word_embeddings == tied
    saved = logits_of(hf)
    assert report_max_diff(f"{scenario} saved checkpoint vs the sharded model", (saved - results[0]["logits"]).abs().max().item()) == 0.0
    diff = (saved - logits_of(single.eval())).abs().max().item()
    assert report_max_diff(f"{scenario} ({rows} rows) saved checkpoint vs one process", diff) <= SINGLE_PROCESS_ATOL[rows]


def test_shard_model_refuses_bad_arguments():
    model = _model({}, False)
    with pytest.raises(ValueError, match="holds no LlamaDecoderLayer"):
        shard_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model=str"):
        shard_model("model")
    with pytest.raises(ValueError, match=r"reshard_after_forward='yes'; expected True, False or an int >= 2"):
        shard_model(model, reshard_after_forward="yes")
    with pytest.raises(ValueError, match="reshard_after_forward=1;"):
        shard_model(model, reshard_after_forward=1)
    with pytest.raises(ValueError, match="mp_policy=str; expected None or a torch.distributed.fsdp.MixedPrecisionPolicy"):
        shard_model(model, mp_policy="bf16")
    with pytest.raises(ValueError, match="mesh=int; expected None or a torch.distributed DeviceMesh"):
        shard_model(model, mesh=2)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        shard_model(model)


def test_shard_model_refuses_a_parameter_shared_across_units():
    model = _model({}, False)
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' is shared with \['model.layers.1"):
        shard_model(model)


def test_save_pretrained_writes_the_given_state_dict(tmp_path):
    """transformers' state_dict= argument: those weights are written, the config comes from the model."""
    model = _model({"tie_word_embeddings": True}, False).eval()
    state = {name: t + 1.0 for name, t in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=state)
    model.load_state_dict(state)
    assert report_max_diff("save_pretrained(state_dict=)", (logits_of(hf_load(tmp_path)) - logits_of(model)).abs().max().item()) == 0.0
