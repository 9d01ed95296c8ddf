"""Mixture of experts: routing (modeling/layers/moe.py), the MoE GPT, expert parallelism over 2 CPU ranks
(modeling/layers/moe_dispatch.py, trainer/engines/expert_parallel.py under the DeepSpeed engine), its
checkpoints, resume and export.

The multi-process tests reuse test_distributed's launchers and run configs on its token dataset.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from modeling.text.gpt import MLP, GPTConfig
from modeling.layers.moe import MoEConfig, MoEMLP, expert_capacity, route
from modeling.registry import build_model
from test_distributed import TIMEOUT, Runs, env, launcher_command, losses, run

# 1 rank routing a batch of 8 sequences where 2 routed 4 each: other capacity drops, another aux loss
# (measured: 4e-5 .. 3e-4 apart over 3 steps)
RESIZE_RTOL = 1e-3
MOE_ARGS = {"moe_num_experts": 4, "moe_top_k": 2, "moe_capacity_factor": 1.0, "moe_aux_loss_weight": 0.01}


def _token_batch(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    if name == "tokcom_diffusion":
        return {"input_ids": torch.randint(0, 256, (2, 32))}
    length = model.max_positions if name == "FlatGPT" else 16
    tokens = torch.randint(0, 64, (2, length + 1))
    return {"idx": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("name, args", [
    ("gpt", {"vocab_size": 64, "sequence_len": 16}),
    ("tokcom_diffusion", {"vae_checkpoint": None}),  # the denoiser's blocks
    ("FlatGPT", {"vocab_size": 64}),  # the HF backbone's decoder layers
])
def test_every_family_takes_moe_mlps_and_trains_on_their_aux_loss(name, args):
    """The MoE knobs are the same fields in every family; the training loss adds weight x the aux loss."""
    losses_by_weight = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model(name, "debug", {**args, "moe_num_experts": 4, "moe_layers": "1", "moe_aux_loss_weight": weight})
        torch.manual_seed(1)
        batch = _token_batch(model, name)
        losses_by_weight[weight] = model.train()(**batch)
        moe_layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
        assert len(moe_layers) == 1 and moe_layers[0].num_experts == 4
    aux_loss = moe_layers[0].aux_loss
    assert 0.9 <= aux_loss.item() <= 4.0  # E * sum f_e P_e: about 1 when balanced, E when collapsed
    torch.testing.assert_close(losses_by_weight[1.0] - losses_by_weight[0.0], aux_loss, rtol=1e-5, atol=1e-6)
    dense = build_model(name, "debug", args, device="meta")
    assert model.num_flops_per_token() > dense.num_flops_per_token()  # top 2 of 4 experts as wide as the dense MLP


def probs_to_logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()  # softmax(log p) == p


def make_moe(activation: str = "relu2", seed: int = 0, **config) -> MoEMLP:
    """A small MoE layer with every weight random (the GPT init zeroes w_out)."""
    torch.manual_seed(seed)
    moe = MoEMLP(8, 16, MoEConfig(**{"num_experts": 4, "top_k": 2, "activation": activation, **config}))
    moe.init_weights(in_std=0.5, out_std=0.5, router_std=0.5)
    return moe


# ------------------------------------------------------------------ routing


def test_top_k_routing_and_gates():
    logits = probs_to_logits([[0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.1, 0.2]])
    top2 = route(logits, top_k=2, capacity=None)
    assert top2.expert_index.tolist() == [[1, 2], [0, 3]]
    torch.testing.assert_close(top2.gates, torch.tensor([[0.625, 0.375], [0.75, 0.25]]))  # renormalized over the 2
    top1 = route(logits, top_k=1, capacity=None)
    assert top1.expert_index.tolist() == [[1], [0]]
    torch.testing.assert_close(top1.gates, torch.tensor([[0.5], [0.6]]))  # the raw probability (Switch)
    assert top1.is_kept.all()


def test_capacity_serves_first_choices_first_then_token_order():
    # 4 tokens, 2 experts, k 2, capacity 3 per expert: 8 assignments for 6 slots
    logits = probs_to_logits([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert expert_capacity(4, 2, 2, capacity_factor=0.75) == 3
    routing = route(logits, top_k=2, capacity=3)
    # expert 0: first choices of tokens 0, 1, 3 fill it, so token 2's second choice is dropped;
    # expert 1: token 2's first choice, then second choices of tokens 0 and 1; token 3's is dropped
    assert routing.is_kept.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    assert routing.gates[2, 1] == 0 and routing.gates[3, 1] == 0 and routing.gates[3, 0] == pytest.approx(0.6)
    assert expert_capacity(4, 2, 2, capacity_factor=0.0) is None


def test_capacity_drops_only_in_training():
    moe = make_moe(capacity_factor=0.25)  # 1 slot per expert for 8 tokens x 2 choices
    x = torch.randn(8, 8)
    dropped = moe.train()(x)
    full = moe.eval()(x)
    assert not torch.allclose(dropped, full)
    moe.config = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.0)
    torch.testing.assert_close(moe.train()(x), full)


def test_aux_loss_by_hand():
    # k 1: both tokens pick expert 0, so f = (1, 0); mean probabilities P = (0.7, 0.3): 2 * (1 * 0.7) = 1.4
    routing = route(probs_to_logits([[0.8, 0.2], [0.6, 0.4]]), top_k=1, capacity=None)
    assert routing.aux_loss.item() == pytest.approx(1.4)
    # perfectly balanced: 1.0
    routing = route(probs_to_logits([[0.5, 0.5], [0.5, 0.5]]), top_k=1, capacity=None)
    assert routing.aux_loss.item() == pytest.approx(1.0)
    # k 2 over 3 experts: f = (2, 1, 1) / 4, P = (0.5, 0.3, 0.2) -> 3 * (0.25 + 0.075 + 0.05) = 1.125
    routing = route(probs_to_logits([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]]), top_k=2, capacity=None)
    assert sorted(routing.expert_index[1].tolist()) in ([0, 1], [0, 2])
    routing = route(probs_to_logits([[0.6, 0.3, 0.1], [0.4, 0.1, 0.5]]), top_k=2, capacity=None)
    assert routing.aux_loss.item() == pytest.approx(3 * (0.5 * 0.5 + 0.25 * 0.2 + 0.25 * 0.3))


@pytest.mark.parametrize("activation", ["relu2", "gelu", "silu", "swiglu"])
def test_moe_equals_per_token_reference(activation):
    moe = make_moe(activation).eval()
    x = torch.randn(2, 5, 8)
    x_flat = x.reshape(-1, 8)
    probs = moe.router(x_flat).softmax(-1)
    top_probs, top_index = probs.topk(2)
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    expected = torch.zeros_like(x_flat)
    for n in range(x_flat.size(0)):
        for j in range(2):
            expected[n] += top_probs[n, j] * moe.experts._expert(int(top_index[n, j]), x_flat[n : n + 1])[0]
    torch.testing.assert_close(moe(x), expected.view_as(x))


def test_one_expert_is_the_dense_mlp():
    config = GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=8)
    dense = MLP(config)
    moe = MoEMLP(8, 32, MoEConfig(num_experts=1, top_k=1))
    with torch.no_grad():
        moe.experts.w_in.copy_(dense.c_fc.weight.T[None])
        moe.experts.w_out.copy_(dense.c_proj.weight.T[None])
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(moe(x), dense(x))


def test_gradients_reach_router_and_experts():
    for top_k in (1, 2):
        moe = make_moe(top_k=top_k).train()
        x = torch.randn(16, 8)
        moe(x).square().sum().backward()
        assert moe.router.weight.grad.abs().sum() > 0, f"top_k {top_k}: no task gradient to the router"
        # experts that got a token learn; the others get a zero gradient, never None (DDP/DeepSpeed need one)
        routing = route(moe.router(x), top_k, expert_capacity(16, 4, top_k, moe.config.capacity_factor))
        used = torch.bincount(routing.expert_index[routing.is_kept], minlength=4) > 0
        assert ((moe.experts.w_in.grad.flatten(1).abs().sum(1) > 0) == used).all()
    moe = make_moe()
    moe(torch.randn(16, 8))
    moe.aux_loss.backward()  # the load-balancing loss alone trains the router
    assert moe.router.weight.grad.abs().sum() > 0 and moe.experts.w_in.grad is None


# -------------------------------------------------------------------- GPT


def make_gpt(**args) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("gpt", "debug", {**MOE_ARGS, **args})
    with torch.no_grad():  # nanochat's init zeroes the output projections: make every path carry signal
        for name, param in model.named_parameters():
            if name.endswith(("c_proj.weight", "w_out")) or name == "lm_head.weight":
                nn.init.normal_(param, std=1.0 / math.sqrt(param.size(-2 if name.endswith("w_out") else 1)))
    return model


def test_gpt_moe_layers_and_flops():
    model = make_gpt(moe_layers="1")
    assert [type(block.mlp).__name__ for block in model.blocks] == ["MLP", "MoEMLP"]
    dense = build_model("gpt", "debug")
    mlp_params = sum(p.numel() for p in dense.blocks[1].mlp.parameters())
    assert model.num_params() == dense.num_params() + 3 * mlp_params + 4 * 64  # 4 experts and a router instead of 1 MLP
    # a token runs through 2 of the 4 experts
    assert model.num_flops_per_token() == dense.num_flops_per_token() + 6 * (mlp_params + 4 * 64)
    with pytest.raises(ValueError, match="moe_top_k"):
        build_model("gpt", "debug", {"moe_num_experts": 2, "moe_top_k": 3})
    with pytest.raises(ValueError, match="moe_layers"):
        build_model("gpt", "debug", {"moe_num_experts": 2, "moe_layers": "0,5"})


def test_gpt_training_loss_includes_weighted_aux_loss():
    model = make_gpt(moe_capacity_factor=0.0, moe_aux_loss_weight=0.5)  # no drops: train and eval route alike
    idx = torch.randint(0, 256, (2, 16))
    train_loss = model.train()(idx, targets=idx)
    aux_losses = [block.mlp.aux_loss for block in model.blocks]
    eval_loss = model.eval()(idx, targets=idx)
    torch.testing.assert_close(train_loss, eval_loss + 0.5 * torch.stack(aux_losses).mean())
    assert F.cross_entropy(model(idx).view(-1, 256), idx.view(-1)).item() == pytest.approx(eval_loss.item())


def test_gpt_moe_kv_cache_and_gradient_checkpointing():
    model = make_gpt().eval()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(idx)
        cache = model.make_kv_cache(batch_size=2, max_len=12)
        pieces = [model(idx[:, :7], kv_cache=cache)] + [model(idx[:, t : t + 1], kv_cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)

    model.train()
    model(idx, targets=idx).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(idx, targets=idx).backward()  # the aux loss leaves the recomputed blocks by an attribute
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_expert_parallel_settings_are_checked():
    from core.config import EngineConfig
    from trainer.engines.expert_parallel import setup_expert_parallel

    with pytest.raises(ValueError, match="engine.expert_parallel_size > 1 needs engine.kind deepspeed"):
        EngineConfig(kind="single", expert_parallel_size=2)
    assert setup_expert_parallel(make_gpt(), 1, 2, 0) is None
    for model, size, world, stage, message in [
        (build_model("gpt", "debug"), 2, 2, 0, "needs a model with MoE layers"),
        (make_gpt(), 2, 3, 0, "must divide the number of ranks"),
        (make_gpt(moe_num_experts=6), 4, 4, 0, "must divide the 6 experts of blocks.0.mlp"),
        (make_gpt(), 2, 2, 3, "ZeRO stage 0, 1 or 2"),
    ]:
        with pytest.raises(UserError, match=message):
            setup_expert_parallel(model, size, world, stage)


def test_only_the_dispatch_module_of_modeling_imports_distributed_code():
    """DESIGN.md: modeling/ never imports deepspeed, accelerate or torch.distributed, except the MoE
    dispatch module, which takes its process group from the engine."""
    import ast
    from pathlib import Path

    import modeling

    for path in sorted(Path(modeling.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        forbidden = {name for name in imported if name.split(".")[0] in ("deepspeed", "accelerate") or name.startswith("torch.distributed")}
        assert forbidden == ({"torch.distributed"} if path.name == "moe_dispatch.py" else set()), path.name


# ----------------------------------------------------- 2 ranks, experts split

# the MoE GPT both 2-rank scripts build: one MoE layer of 4 experts, output projections randomised so
# every path carries signal
MOE_GPT = r"""
def gpt(seed=1):
    torch.manual_seed(seed)
    model = build_model("gpt", "debug", {"vocab_size": 64, "sequence_len": 16, "moe_num_experts": 4, "moe_layers": "1",
                                         "moe_capacity_factor": 1.0, "moe_aux_loss_weight": 0.1})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("c_proj.weight", "w_out")) or name == "lm_head.weight":
                nn.init.normal_(param, std=0.1)
    return model
"""


EXPERT_PARALLEL = r"""
import copy, gc, sys
from pathlib import Path

import torch, torch.distributed as dist
from torch import nn
from deepspeed.utils import safe_get_full_grad

from core.config import EngineConfig, OptimConfig
from modeling.layers.moe import MoEConfig, MoEMLP
from modeling.layers.moe_dispatch import shard_experts
from modeling.registry import build_model
from trainer.engines.deepspeed import DeepSpeedEngine

dist.init_process_group("gloo")
rank = dist.get_rank()
check = torch.testing.assert_close

# one MoE layer, experts split over the 2 ranks, against the whole layer with the same weights
torch.manual_seed(0)
whole = MoEMLP(16, 32, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, activation="swiglu"))
whole.init_weights(in_std=0.3, out_std=0.3, router_std=0.3)
split = copy.deepcopy(whole)
shard_experts(split, dist.group.WORLD)
num_params = lambda module: sum(p.numel() for p in module.parameters())
assert 2 * num_params(split.experts) == num_params(whole.experts), (num_params(split.experts), num_params(whole.experts))
assert num_params(split.router) == num_params(whole.router) and split.experts.first_expert == 2 * rank
tokens = [torch.randn(3, 10, 16) for _ in range(2)]  # rank r routes tokens[r]
for mode in ("train", "eval"):  # with capacity drops, and without
    whole.zero_grad(), split.zero_grad()
    whole.train(mode == "train"), split.train(mode == "train")
    outputs = [whole(x) for x in tokens]
    weights = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(1))
    sum((out * w).sum() for out, w in zip(outputs, weights)).backward()
    out = split(tokens[rank])
    (out * weights[rank]).sum().backward()
    check(out, outputs[rank])
    # the router is replicated: its gradient here is that of this rank's tokens only
    check(split.router.weight.grad, torch.autograd.grad((whole(tokens[rank]) * weights[rank]).sum(), whole.router.weight)[0])
    for name, param in split.experts.named_parameters():  # each expert's gradient: both ranks' tokens
        check(param.grad, getattr(whole.experts, name).grad[2 * rank : 2 * rank + 2], msg=f"{mode} {name}")

# the DeepSpeed engine: gradients equal one device's for the mean of the ranks' losses (ZeRO 0 and 2),
# and a ZeRO-0 checkpoint (per-expert-rank optimizer files) restores the training
{MOE_GPT}

def engine(model, stage):
    optim = OptimConfig(lr=1e-2, micro_batch_size=2, warmup_steps=0, schedule="constant", grad_clip=0.0)
    return DeepSpeedEngine(model, optim, EngineConfig(kind="deepspeed", zero_stage=stage, expert_parallel_size=2),
                           10, torch.device("cpu"), 2)

generator = torch.Generator().manual_seed(2)
batches = [[torch.randint(0, 64, (2, 16), generator=generator) for _ in range(2)] for _ in range(3)]
checkpoint = Path(sys.argv[1])
for stage in (0, 2):
    reference, model = gpt(), gpt()
    ds = engine(model, stage)
    assert 2 * sum(p.numel() for p in model.blocks[1].mlp.experts.parameters()) == \
        sum(p.numel() for p in reference.blocks[1].mlp.experts.parameters())
    ds.forward_backward({"idx": batches[0][rank], "targets": batches[0][rank]}, 1.0)
    reference.train()
    (sum(reference(idx, targets=idx) for idx in batches[0]) / 2).backward()
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad if stage == 0 else safe_get_full_grad(param)
        want = expected[name].grad[2 * rank : 2 * rank + 2] if ".experts." in name else expected[name].grad
        check(grad, want, msg=f"ZeRO-{stage} {name}", rtol=1e-5, atol=1e-6)
    ds.optimizer_step()
    if stage == 0:
        ds.save_checkpoint(checkpoint)
        dist.barrier()
        restored = engine(gpt(seed=5), 0)  # other weights, until the checkpoint is loaded
        restored.load_checkpoint(checkpoint, 2)
        for trained in (ds, restored):  # two more steps each: the same losses, bit for bit
            trained.losses = []
            for batch in batches[1:]:
                trained.losses.append(trained.forward_backward({"idx": batch[rank], "targets": batch[rank]}, 1.0).item())
                trained.optimizer_step()
        assert restored.losses == ds.losses, (restored.losses, ds.losses)
        whole_model, whole_restored = ds.full_state_dict(), restored.full_state_dict()
        assert whole_model["blocks.1.mlp.experts.w_in"].shape[0] == 4
        for name, tensor in whole_model.items():
            assert torch.equal(tensor, whole_restored[name]), name
print(f"rank {rank} ok")
del ds, restored, trained  # free the engines' pending gloo work before the process group
gc.collect()
dist.destroy_process_group()
"""


def test_expert_parallel_equals_one_device(tmp_path):
    script = tmp_path / "expert_parallel.py"
    script.write_text(EXPERT_PARALLEL.replace("{MOE_GPT}", MOE_GPT))
    (tmp_path / "checkpoint").mkdir()
    command = [*launcher_command("torchrun", 2, script=str(script)), str(tmp_path / "checkpoint")]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
    files = sorted(p.name for p in (tmp_path / "checkpoint" / "experts").iterdir())
    assert files == ["blocks.1.mlp.expert-0000.safetensors", "blocks.1.mlp.expert-0001.safetensors",
                     "blocks.1.mlp.expert-0002.safetensors", "blocks.1.mlp.expert-0003.safetensors", "index.json"]
    # its experts' optimizer state is torch's, per expert-parallel rank: not re-partitioned for another size
    from trainer.engines.expert_reshard import convert

    with pytest.raises(UserError, match="was written under ZeRO stage 0, whose experts' optimizer state DeepSpeed cannot"):
        convert(tmp_path / "checkpoint", "deepspeed", {}, 2, 2, 1, [])


# ------------------------------- another expert-parallel size: experts re-partitioned

RESIZE = r"""
import gc, sys
from pathlib import Path

import torch, torch.distributed as dist
from torch import nn
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from core.config import EngineConfig, OptimConfig
from modeling.registry import build_model
from trainer.engines.deepspeed import DeepSpeedEngine

dist.init_process_group("gloo")
rank, ranks = dist.get_rank(), dist.get_world_size()  # 2 ranks: experts split over both; 1: all experts on it
root, steps = Path(sys.argv[1]), sys.argv[2:]

{MOE_GPT}

def engine(seed=1):
    # the same global batch: 2 ranks x 1 micro-batch, or 1 rank x 2 micro-batches, each routing the tokens a rank
    # did (capacity drops and aux loss alike)
    optim = OptimConfig(lr=1e-2, micro_batch_size=2, grad_accum_steps=2 // ranks, warmup_steps=0, schedule="constant",
                        grad_clip=0.0)
    return DeepSpeedEngine(gpt(seed), optim, EngineConfig(kind="deepspeed", zero_stage=2, expert_parallel_size=ranks),
                           10, torch.device("cpu"), ranks)

generator = torch.Generator().manual_seed(2)
batches = [[torch.randint(0, 64, (2, 16), generator=generator) for _ in range(2)] for _ in range(4)]

def train(trained, steps):
    losses = []
    for step in steps:
        micro = [batches[step][rank]] if ranks == 2 else batches[step]
        loss = sum(trained.forward_backward({"idx": idx, "targets": idx}, 1.0) for idx in micro) / len(micro)
        trained.optimizer_step()
        dist.all_reduce(loss)
        losses.append(loss.item() / ranks)
    return losses

def whole(trained):
    # every parameter's fp32 master and Adam moments, experts gathered whole (collective)
    # DeepSpeed 0.19 links the moments of the first optimizer group only (at its first step): link them all
    trained.ds.optimizer._hp_optimizer_states_linked = False
    trained.ds.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, param in trained.model.named_parameters():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            value = safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
            if ".experts." in name and ranks > 1:
                pieces = [torch.empty_like(value) for _ in range(ranks)]
                dist.all_gather(pieces, value.contiguous())
                value = torch.cat(pieces)
            state[f"{name} {key}"] = value.clone()
    return state

if "write" in steps:  # 1 step, checkpoint, 3 more: the uninterrupted run
    trained = engine()
    losses = train(trained, [0])
    trained.save_checkpoint(root / f"ep{ranks}")
    state = whole(trained)
    losses += train(trained, [1, 2, 3])
    if rank == 0:
        torch.save({"state": state, "losses": losses}, root / f"ep{ranks}.pt")
    del trained
if "resume" in steps:  # the other size's checkpoint: its experts, masters and moments here, then its losses
    other = 3 - ranks
    restored = engine(seed=5)  # other weights, until the checkpoint is loaded
    restored.load_checkpoint(root / f"ep{other}", other)
    state, losses = whole(restored), train(restored, [1, 2, 3])
    if rank == 0:
        expected = torch.load(root / f"ep{other}.pt")
        assert state.keys() == expected["state"].keys()
        for key, value in expected["state"].items():
            assert torch.equal(state[key], value), key
        torch.testing.assert_close(losses, expected["losses"][1:], rtol=1e-5, atol=0)
    del restored
print(f"rank {rank} ok")
gc.collect()
dist.destroy_process_group()
"""


def test_experts_are_repartitioned_for_another_expert_parallel_size(tmp_path):
    """ZeRO-2 checkpoints of 2 ranks with experts split over both, and of 1 rank with all of them, each
    resume at the other size: every expert, its fp32 master and Adam moments equal, bit for bit, what
    the writing run held, and the losses follow the writing run's."""
    script = tmp_path / "resize.py"
    script.write_text(RESIZE.replace("{MOE_GPT}", MOE_GPT))
    for ranks, steps in [(1, ["write"]), (2, ["write", "resume"]), (1, ["resume"])]:
        command = [*launcher_command("torchrun", ranks, script=str(script)), str(tmp_path), *steps]
        result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
        assert all(f"rank {rank} ok" in result.stdout for rank in range(ranks))
    # each converted once, for the size that loaded it, next to its shards
    assert (tmp_path / "ep1" / "deepspeed_universal_ep2" / "zero" / "blocks.1.mlp.experts.w_in" / "exp_avg.pt").is_file()
    expert = torch.load(tmp_path / "ep2" / "deepspeed_universal_ep1" / "zero" / "blocks.1.mlp.experts.w_in" / "fp32.pt")
    assert expert["param"].shape == (4, 64, 256) and expert["is_expert_param"] and expert["ep_num_experts"] == 4


# ------------------------------------------- the trainer under `deepspeed`, 2 ranks


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, token_dataset):
    """6 steps of the MoE GPT on 2 ranks, experts split over both (ZeRO-2), checkpoints at 3 and 6;
    validation on the train split, which both ranks read, at the end."""
    runs = Runs(tmp_path_factory.mktemp("moe"), token_dataset, "zero2")
    runs.run(2, moe_config(runs, "two", 2, engine={"expert_parallel_size": 2}))
    return runs


def moe_config(runs, name: str, ranks: int, **sections):
    return runs.config(name, ranks, run={"max_steps": 6}, model={"args": MOE_ARGS}, data={"val_split": "train"},
                       eval={"every_steps": 0, "num_batches": 2}, checkpoint={"every_steps": 3}, **sections)


def read_records(run_dir) -> list[dict]:
    from trainer.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def test_checkpoint_holds_each_expert_once(moe_runs):
    checkpoint = moe_runs.root / "two" / "checkpoints" / "step-00000006"
    experts = sorted(p.name for p in (checkpoint / "experts").iterdir())
    assert experts == [f"blocks.{b}.mlp.expert-{e:04d}.safetensors" for b in (0, 1) for e in range(4)] + ["index.json"]
    index = json.loads((checkpoint / "experts" / "index.json").read_text())
    assert index["expert_parallel_size"] == 2 and index["layers"]["blocks.1.mlp"]["num_experts"] == 4
    model_states = torch.load(checkpoint / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "blocks.0.mlp.router.weight" in model_states and not [k for k in model_states if ".experts." in k]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["engine_info"]["expert_parallel_size"] == 2
    got = losses(moe_runs.root / "two")
    assert sorted(got) == list(range(1, 7)) and got[6] < got[1] - 0.2  # it learns


def test_resume_restores_the_same_losses(moe_runs):
    moe_runs.from_checkpoint("two", 3, "resumed")
    moe_runs.run(2, moe_config(moe_runs, "resumed", 2, engine={"expert_parallel_size": 2}), "--resume", "auto")
    resumed, straight = (read_records(moe_runs.root / name) for name in ("resumed", "two"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit for bit: each expert back in its place
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]


def test_export_is_one_device_model_with_every_expert(moe_runs, tmp_path):
    """The exported model, on one device, gives the validation loss the 2 expert-parallel ranks measured."""
    from core.config import TrainConfig, load_config
    from sharding.manifest import Manifest
    from trainer.data import Batches, causal_lm_batch
    from trainer.export import export_checkpoint
    from trainer.inference import load_model

    export_checkpoint(moe_runs.root / "two", tmp_path / "export")
    model, state, _ = load_model(tmp_path / "export")
    assert state["exported_from"]["engine_info"]["expert_parallel_size"] == 2
    assert model.blocks[0].mlp.experts.w_in.shape == (4, 64, 256)
    cfg = load_config(moe_runs.root / "two.yaml", TrainConfig)
    rank_losses = []
    for rank in (0, 1):
        batches = Batches(Manifest.read(cfg.data.dataset), cfg.data, "train", batch_size=4, rank=rank, world_size=2,
                          seed=cfg.run.seed, shuffle=False, num_workers=0).take(2)
        with torch.no_grad():
            rank_losses.append(torch.stack([model(**causal_lm_batch(b, torch.device("cpu"))) for b in batches]).mean())
    measured = read_records(moe_runs.root / "two")[-1]["val_loss"]
    assert torch.stack(rank_losses).mean().item() == pytest.approx(measured, rel=1e-5)


def test_resume_on_one_rank_holding_every_expert(moe_runs):
    """The 2-rank checkpoint (experts split over both) resumes on 1 rank holding all 4 experts of each
    layer: re-partitioned (`expert_reshard.py`), the run finishes and follows the uninterrupted one, and
    its own checkpoints are those of an unsplit model."""
    moe_runs.from_checkpoint("two", 3, "one-rank")
    moe_runs.run(1, moe_config(moe_runs, "one-rank", 1), "--resume", "auto")
    got, straight = losses(moe_runs.root / "one-rank"), losses(moe_runs.root / "two")
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(straight[step], rel=RESIZE_RTOL), f"step {step}"
    checkpoint = moe_runs.root / "one-rank" / "checkpoints" / "step-00000006"
    assert not (checkpoint / "experts").exists()
    assert (moe_runs.root / "one-rank" / "checkpoints" / "step-00000003" / "deepspeed_universal_ep1").is_dir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["engine_info"]["expert_parallel_size"] == 1


def test_missing_expert_exits_2(moe_runs):
    """Resumed on 1 rank holding every expert: a checkpoint without all its experts is refused before
    anything is loaded."""
    checkpoint = moe_runs.from_checkpoint("two", 3, "refused") / "checkpoints" / "step-00000003"
    (checkpoint / "experts" / "blocks.1.mlp.expert-0003.safetensors").unlink()
    result = run("python", 1, moe_config(moe_runs, "refused", 1), "--resume", "auto", check=False)
    expected = (f"--resume auto: every checkpoint in {checkpoint.parent} fails its checks (newest step-00000003: "
                "experts/blocks.1.mlp.expert-0003.safetensors is missing)")
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_partitions_of_another_layout_are_refused(moe_runs, tmp_path):
    """Re-partitioning reads the optimizer files as the expert-parallel size and world size say they were
    cut: told another layout, the fragments do not make the model's tensors, and it says so in one line."""
    from trainer.engines.expert_reshard import convert
    from trainer.engines.expert_parallel import read_index

    checkpoint = tmp_path / "step-00000006"
    shutil.copytree(moe_runs.root / "two" / "checkpoints" / "step-00000006", checkpoint)
    experts = {f"{name}.experts.{param}": spec["num_experts"]
               for name, spec in read_index(checkpoint)["layers"].items() for param in spec["params"]}
    with pytest.raises(UserError, match=r"optimizer partitions do not make whole parameters for 2 rank\(s\) with "
                                        r"expert_parallel_size 1: shape '\[2, 64, 256\]' is invalid"):
        convert(checkpoint, "deepspeed", experts, 1, 2, 1, [{"name": "dense_0"}])
    assert sorted(p.name for p in checkpoint.iterdir() if "universal" in p.name) == []  # nothing half-written left


def test_missing_or_foreign_expert_files_are_refused(moe_runs, tmp_path):
    from trainer.engines.expert_parallel import check_experts, read_index
    from trainer.export import export_checkpoint

    checkpoint = tmp_path / "step-00000006"
    shutil.copytree(moe_runs.root / "two" / "checkpoints" / "step-00000006", checkpoint)
    specs = read_index(checkpoint)["layers"]
    (checkpoint / "experts" / "blocks.1.mlp.expert-0003.safetensors").unlink()
    with pytest.raises(UserError, match=r"expert 3 of blocks.1.mlp is missing \(experts/blocks.1.mlp.expert-0003"):
        check_experts(checkpoint, read_index(checkpoint), specs)
    with pytest.raises(UserError, match=r"fails its checks \(experts/blocks.1.mlp.expert-0003.safetensors is missing\)"):
        export_checkpoint(checkpoint, tmp_path / "export")  # the checkpoint's own file list says so first
    other = {**specs, "blocks.1.mlp": {**specs["blocks.1.mlp"], "num_experts": 8}}
    with pytest.raises(UserError, match="the experts of blocks.1.mlp do not match the model: 4 experts"):
        check_experts(checkpoint, read_index(checkpoint), other)
    # an expert file of another shape (e.g. copied from another model)
    from safetensors.torch import save_file

    save_file({"w_in": torch.zeros(64, 128), "w_out": torch.zeros(128, 64)},
              checkpoint / "experts" / "blocks.1.mlp.expert-0003.safetensors")
    with pytest.raises(UserError, match=r"fails its checks \(experts/blocks.1.mlp.expert-0003.safetensors holds \d+ bytes"):
        export_checkpoint(checkpoint, tmp_path / "export")
    # ... and past the file list (a marker rewritten by hand), the tensors' shapes
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["files"]["experts/blocks.1.mlp.expert-0003.safetensors"] = (checkpoint / "experts" / "blocks.1.mlp.expert-0003.safetensors").stat().st_size
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(UserError, match=r"blocks.1.mlp.expert-0003.safetensors holds .*\[64, 128\].*, expected"):
        export_checkpoint(checkpoint, tmp_path / "export")
