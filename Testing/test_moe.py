"""TGH-MoE: zero delta at initialisation, load balancing, the task router, the stage-2 copy."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import QUESTIONS, REPORT_PROMPTS, randomise_experts, train_task_router

from model_core.config import MoEConfig
from model_core.families import map_2d_state_dict_name
from model_core.moe import MoERoutingError, load_balancing_loss, set_moe, top_k_gates
from model_core.tiny import build_tiny_2d_mllm, build_tiny_ctmllm
from model_core.training.stages import enable_gradient_checkpointing


def volumes(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 9, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["internvl", "llava"])
@pytest.mark.parametrize("mode", ["token", "tgh_hard", "tgh_soft"])
def test_moe_adds_nothing_at_initialisation(family: str, mode: str) -> None:
    base = build_tiny_ctmllm(family)
    model = build_tiny_ctmllm(family, moe=MoEConfig(mode=mode, targets=("mlp", "attention")))
    batch = volumes()
    prompts = [REPORT_PROMPTS[0], QUESTIONS[0]]
    with torch.no_grad():
        expected = base.encode_volumes(batch)
        got = model.encode_volumes(batch, prompts=prompts)
    assert torch.allclose(got, expected, atol=1e-5)
    # ... while the experts are really wired in: a nonzero B changes the output
    randomise_experts(model, seed=1)
    with torch.no_grad():
        changed = model.encode_volumes(batch, prompts=prompts)
    assert (changed - expected).abs().max() > 1e-3


def test_moe_keeps_every_2d_tensor_under_its_mapped_name() -> None:
    mllm, _ = build_tiny_2d_mllm("internvl")
    original = {name: tensor.clone() for name, tensor in mllm.state_dict().items()}
    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard", targets=("mlp", "attention")))
    state = model.state_dict()
    for name, tensor in original.items():
        assert torch.equal(state[map_2d_state_dict_name(name)], tensor), name
    new = [name for name in state if not any(name == map_2d_state_dict_name(o) for o in original)]
    assert new and all(name.startswith("volume_adapter.moe.") for name in new)
    assert any(".experts.report." in name for name in new) and any(".experts.vqa." in name for name in new)
    assert any(name.startswith("volume_adapter.moe.task_router.") for name in new)


def test_load_balancing_loss_is_minimal_for_uniform_routing() -> None:
    experts, tokens = 4, 64
    uniform = torch.full((tokens, experts), 1 / experts)
    round_robin = (
        torch.nn.functional.one_hot(torch.arange(tokens) % experts, experts).float() * 0.7 + 0.3 / experts
    )
    collapsed = torch.zeros(tokens, experts)
    collapsed[:, 0] = 1.0
    half = torch.cat([collapsed[: tokens // 2], round_robin[tokens // 2 :]])
    losses = [load_balancing_loss(p, top_k=1).item() for p in (uniform, round_robin, half, collapsed)]
    assert losses[0] == pytest.approx(1.0)
    assert losses[1] == pytest.approx(1.0, abs=1e-6)
    assert losses[0] < losses[2] < losses[3]
    assert losses[3] == pytest.approx(experts)
    # top-2 routing: uniform is still 1, a router that always prefers the same two experts is not
    two = torch.tensor([0.45, 0.45, 0.05, 0.05]).expand(tokens, experts)
    assert load_balancing_loss(uniform, top_k=2).item() == pytest.approx(1.0)
    assert load_balancing_loss(two, top_k=2).item() > 1.5


def test_top_k_gates_keep_k_experts_summing_to_one() -> None:
    logits = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    gates, probs = top_k_gates(logits, top_k=2)
    assert torch.allclose(gates.sum(-1), torch.ones(2, 5))
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(gates.argmax(-1), probs.argmax(-1))


def test_a_top1_router_learns_from_the_output_as_switch_does() -> None:
    """With one expert per token the gate is the router's raw probability, not a constant 1."""
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    gates, probs = top_k_gates(logits, top_k=1)
    assert torch.equal(gates.max(-1).values, probs.max(-1).values) and ((gates > 0).sum(-1) == 1).all()

    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="token", top_k=1)).train()
    randomise_experts(model, seed=6)
    model.encode_volumes(volumes(1)).square().mean().backward()  # no balance loss: the output alone
    routers = [p for n, p in model.volume_adapter.moe.named_parameters() if ".routers." in n]
    assert routers and all(p.grad is not None and p.grad.abs().max() > 0 for p in routers)


def test_hard_router_learns_the_prompt_task_and_a_forced_task_overrides_it() -> None:
    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard", router_loss_weight=1.0))
    prompts = REPORT_PROMPTS + QUESTIONS
    labels = ["report"] * len(REPORT_PROMPTS) + ["vqa"] * len(QUESTIONS)
    assert train_task_router(model).tasks == labels  # the argmax of the last forward
    batch = volumes(len(prompts))
    with torch.no_grad():
        assert model.encode(batch, prompts=prompts).tasks == labels
    assert [model.route(prompt) for prompt in prompts] == labels  # the router alone, no volume

    randomise_experts(model, seed=2)  # task experts now differ, so outputs tell which one ran
    volume = batch[0]
    routed_vqa = model.encode_volume(volume, prompt=QUESTIONS[0])
    routed_report = model.encode_volume(volume, prompt=REPORT_PROMPTS[0])
    forced_vqa = model.encode_volume(volume, task="vqa", prompt=REPORT_PROMPTS[0])
    assert (routed_vqa.task, routed_report.task, forced_vqa.task) == ("vqa", "report", "vqa")
    assert torch.equal(forced_vqa.tokens, routed_vqa.tokens)
    assert not torch.allclose(routed_report.tokens, routed_vqa.tokens)


def test_task_level_moe_needs_a_task_or_a_prompt() -> None:
    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard"))
    with pytest.raises(MoERoutingError, match="prompt"):
        model.encode_volume(volumes(1)[0])
    with pytest.raises(MoERoutingError, match="no expert"):
        model.volume_adapter.moe.task_index("segmentation")


@pytest.mark.parametrize("mode", ["tgh_hard", "tgh_soft"])
def test_stage2_copy_makes_every_task_expert_equal_the_token_moe(mode: str) -> None:
    token = MoEConfig(mode="token", targets=("mlp", "attention"))
    model = build_tiny_ctmllm("llava", moe=token)
    randomise_experts(model, seed=3)
    batch = volumes(2)
    with torch.no_grad():
        expected = model.encode_volumes(batch)
    set_moe(model, MoEConfig(mode=mode, targets=("mlp", "attention")))
    assert model.config.moe.mode == mode
    with torch.no_grad():
        for task in ("report", "vqa"):
            got = model.encode_volumes(batch, tasks=[task, task])
            assert torch.allclose(got, expected, atol=1e-6), task
        mixed = model.encode_volumes(batch, tasks=["report", "vqa"])
        routed = model.encode_volumes(batch, prompts=[REPORT_PROMPTS[0], QUESTIONS[0]])
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert torch.allclose(routed, expected, atol=1e-6)  # soft: a mix of equal experts is that expert


def test_set_moe_refuses_to_drop_trained_experts() -> None:
    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard"))
    with pytest.raises(ValueError, match="only a token-level MoE converts"):
        set_moe(model, MoEConfig(mode="token"))
    token_model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="token", rank=4))
    with pytest.raises(ValueError, match="same num_experts"):
        set_moe(token_model, MoEConfig(mode="tgh_hard", rank=8))


def test_moe_blocks_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="moe.blocks contains 7"):
        build_tiny_ctmllm("internvl", moe=MoEConfig(mode="token", blocks=(7,)))


@pytest.mark.parametrize("mode", ["token", "tgh_soft", "tgh_hard"])
def test_routing_survives_gradient_checkpointing(mode: str) -> None:
    """Recomputation in the backward pass must route exactly as the forward did."""
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode=mode)).train()
        randomise_experts(model, seed=4)
        if checkpointing:
            enable_gradient_checkpointing(model)
        out = model.compute_loss(
            volumes(2), [REPORT_PROMPTS[0], QUESTIONS[1]], ["A cyst.", "A. yes"], ["report", "vqa"]
        )
        out.loss.backward()
        grads.append(
            {n: p.grad.clone() for n, p in model.volume_adapter.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_tower_checkpointing_without_the_routing_context_is_refused_clearly() -> None:
    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard")).train()
    model.vision_tower.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    out = model.compute_loss(volumes(1), [QUESTIONS[0]], ["A. yes"], ["vqa"])
    with pytest.raises(MoERoutingError, match="enable_gradient_checkpointing"):
        out.loss.backward()


def test_two_threads_encoding_at_once_each_get_their_own_expert() -> None:
    """Routing is per call: concurrent encodes with different task experts never mix (the panel's
    worker, ``CTMLLM.stream``'s thread and a batch may encode at the same time)."""
    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard"))
    randomise_experts(model, seed=5)
    volume = volumes(1)[0]
    expected = {task: model.encode_volume(volume, task=task).tokens for task in ("report", "vqa")}
    assert not torch.allclose(expected["report"], expected["vqa"])
    start = threading.Barrier(2)
    wrong: list[str] = []

    def encode_many(task: str) -> None:
        start.wait()
        for _ in range(40):
            features = model.encode_volume(volume, task=task)
            if features.task != task or not torch.equal(features.tokens, expected[task]):
                wrong.append(task)

    workers = [threading.Thread(target=encode_many, args=(task,)) for task in ("report", "vqa")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not wrong, f"{len(wrong)} of 80 concurrent encodes used another call's expert"


def test_generate_lets_the_router_pick_the_expert_and_says_which(routed_model_dir) -> None:
    from model_core.model import CTMLLM

    model = CTMLLM.from_pretrained(routed_model_dir)
    volume = volumes(1)[0]
    report = model.generate(volume, max_new_tokens=4)  # no prompt: the report prompt, routed
    answer = model.generate(volume, QUESTIONS[0], max_new_tokens=4)
    forced = model.generate(volume, REPORT_PROMPTS[0], task="vqa", max_new_tokens=4)
    assert (report.expert, answer.expert, forced.expert) == ("report", "vqa", "vqa")

    features = model.encode_volume(volume, prompt=QUESTIONS[0])
    assert model.generate(features, QUESTIONS[1], max_new_tokens=4).expert == "vqa"
    with pytest.raises(ValueError, match="encoded by the 'vqa' expert, not 'report'"):
        model.generate(features, REPORT_PROMPTS[0], task="report", max_new_tokens=4)
    assert build_tiny_ctmllm("internvl").generate(volume, QUESTIONS[0], max_new_tokens=2).expert is None
