"""TGH-MoE: a Text-Guided Hierarchical Mixture of Experts inside the vision tower.

Two levels, both attached to the tower by hooks so its state-dict names stay those of the 2D
checkpoint (every new tensor lives under ``volume_adapter.moe.*``):

- Token level (``TokenMoE``): in each chosen block, a router scores every visual token from the
  block's input and mixes its top-k of E experts (``top_k_gates``); expert e is a rank-r LoRA
  (``delta_e(x) = alpha / r * B_e A_e x``) on the block's MLP (and optionally attention) linears.
  B starts at zero, so a new MoE adds exactly nothing. A Switch/GShard load-balancing loss keeps
  the experts in use.
- Task level (``TGHMoE`` in modes ``tgh_hard`` / ``tgh_soft``): one full token-level MoE per task
  (report, vqa), and a task router, a small MLP on the language model's mean input embedding of
  the prompt. Hard: each sample goes through exactly one task expert (argmax, or the task the
  caller forces); soft: a softmax-weighted mix of all of them.

State-dict layout (``<set>`` is ``token`` in mode ``token``, else each task name)::

    volume_adapter.moe.experts.<set>.routers.<block>.weight             (E, C)
    volume_adapter.moe.experts.<set>.lora.<block>_<linear>.lora_A       (E, r, in)
    volume_adapter.moe.experts.<set>.lora.<block>_<linear>.lora_B       (E, out, r)
    volume_adapter.moe.task_router.*                                    (task-level modes)

Routing is per call: each tower forward gets its own ``Routing`` (which task expert each sample
uses, each block's token gates, the router outputs for the losses), made active for that call
only through a context variable, so two threads encoding at once never see each other's routing.
Gradient checkpointing recomputes a block in the backward pass, after the forward call has
returned: ``recompute_with_same_routing`` (the ``context_fn`` that
``model_core.training.stages.enable_gradient_checkpointing`` passes to ``torch.utils.checkpoint``)
makes the forward's ``Routing`` active again for that recomputation, so it routes exactly alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model_core.config import MoEConfig
from model_core.families import Family

if TYPE_CHECKING:
    from model_core.model import CTMLLM

TOKEN_SET = "token"
"""Name of the single expert set of a token-level MoE (mode ``token``, and stage 1)."""

ROUTER_HIDDEN = 256
"""Width of the task router's hidden layer (capped by the language model's width)."""


class MoERoutingError(ValueError):
    """A task-level MoE was asked to encode without a way to pick its task expert."""


def default_moe_blocks(num_blocks: int, num_3d_blocks: int) -> tuple[int, ...]:
    """The 3D blocks, or the top two blocks of a pure 2D tower (K=0)."""
    count = num_3d_blocks if num_3d_blocks else min(2, num_blocks)
    return tuple(range(num_blocks - count, num_blocks))


def load_balancing_loss(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` of router probabilities ``(..., E)``.

    ``f_e`` is the fraction of top-k assignments that went to expert e, ``P_e`` its mean router
    probability. It is 1 when routing is uniform and approaches E when every token picks the same
    expert with certainty; only ``P_e`` carries gradient, as in the Switch Transformer.
    """
    num_experts = probs.shape[-1]
    flat = probs.reshape(-1, num_experts).float()  # (N, E)
    chosen = flat.topk(top_k, dim=-1).indices  # (N, k)
    counts = F.one_hot(chosen, num_experts).sum(dim=(0, 1)).float()  # (E,)
    fraction = counts / (flat.shape[0] * top_k)
    return num_experts * (fraction * flat.mean(dim=0)).sum()


def top_k_gates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``(n, T, E)`` -> (gates, probs), both ``(n, T, E)`` float32.

    ``probs`` is the softmax over all experts; ``gates`` keeps each token's top-k probabilities
    and zero elsewhere: renormalised to sum to 1 for k > 1 (GShard), the raw probability for
    k = 1 (Switch), since one renormalised gate is always exactly 1 and the router would get no
    gradient from the output.
    """
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(top_k, dim=-1)
    if top_k > 1:
        values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, indices, values)
    return gates, probs


class LoRAExperts(nn.Module):
    """E rank-r LoRA deltas for one Linear, mixed per token by gates.

    ``lora_A`` ``(E, r, in)`` starts as peft does (Kaiming-uniform), ``lora_B`` ``(E, out, r)`` at
    zero, so the delta is exactly zero until B is trained.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float):
        super().__init__()
        self.num_experts, self.rank = num_experts, rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[expert], a=math.sqrt(5))

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``x`` ``(n, T, in)``, ``gates`` ``(n, T, E)`` -> delta ``(n, T, out)``."""
        e, r = self.num_experts, self.rank
        down = x @ self.lora_A.reshape(e * r, -1).t().to(x.dtype)  # (n, T, E * r)
        down = down.unflatten(-1, (e, r)) * gates.unsqueeze(-1).to(down.dtype)  # (n, T, E, r)
        up = self.lora_B.permute(0, 2, 1).reshape(e * r, -1).to(x.dtype)  # (E * r, out)
        return (down.flatten(-2) @ up) * self.scaling


class TokenMoE(nn.Module):
    """One token-level MoE: per chosen block a router ``C -> E`` and LoRA experts on its linears."""

    def __init__(self, config: MoEConfig, linears: dict[int, dict[str, nn.Linear]], hidden: int) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.routers = nn.ModuleDict(
            {str(block): nn.Linear(hidden, config.num_experts, bias=False) for block in linears}
        )
        self.lora = nn.ModuleDict(
            {
                f"{block}_{name}": LoRAExperts(
                    linear.in_features, linear.out_features, config.num_experts, config.rank, config.alpha
                )
                for block, sites in linears.items()
                for name, linear in sites.items()
            }
        )

    def route(self, block: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block input ``(n, T, C)`` -> (gates, probs) ``(n, T, E)``."""
        router = self.routers[str(block)]
        return top_k_gates(router(hidden.to(router.weight.dtype)), self.top_k)


class TaskRouter(nn.Module):
    """Pooled prompt embedding ``(B, llm_hidden)`` -> task logits ``(B, tasks)``.

    A LayerNorm first makes it indifferent to the scale of the language model's embeddings.
    """

    def __init__(self, prompt_dim: int, num_tasks: int) -> None:
        super().__init__()
        width = min(ROUTER_HIDDEN, prompt_dim)
        self.net = nn.Sequential(
            nn.LayerNorm(prompt_dim), nn.Linear(prompt_dim, width), nn.GELU(), nn.Linear(width, num_tasks)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.to(self.net[1].weight.dtype))


@dataclasses.dataclass
class _SetRoute:
    """How one expert set is applied to the rows of one block call."""

    index: int  # expert set index
    rows: torch.Tensor | None  # rows of the block's batch it sees (None: all)
    row_weight: torch.Tensor | None  # (rows, 1, 1) mixing weight (None: exactly 1)
    gates: torch.Tensor  # (rows, T, E)


@dataclasses.dataclass
class Routing:
    """The routing of one tower forward, made for that call alone (``TGHMoE.plan``).

    ``sample_weights`` ``(B, sets)``: how much each sample goes through each expert set (None: a
    token-level MoE, every row through its one set); ``tasks``: the task expert each sample went
    through (the argmax in soft mode; None without task experts). The block hooks fill ``routes``
    (per block, the expert sets' gates for its rows) and ``probs`` (router probabilities, for the
    balance loss).
    """

    moe: TGHMoE
    sample_weights: torch.Tensor | None = None
    tasks: list[str] | None = None
    task_logits: torch.Tensor | None = None  # (B, sets) when the router read prompts
    task_labels: torch.Tensor | None = None  # (B,) true task indices, for the router's loss
    routes: dict[int, list[_SetRoute]] = dataclasses.field(default_factory=dict)
    probs: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Weighted losses of this call: ``balance`` (mean over expert sets and blocks) and, when
        labels were given, ``router`` (cross-entropy of the task router)."""
        config = self.moe.config
        losses: dict[str, torch.Tensor] = {}
        if self.probs:
            balance = [load_balancing_loss(p, config.top_k) for p in self.probs.values()]
            losses["balance"] = config.balance_loss_weight * torch.stack(balance).mean()
        if self.task_labels is not None and self.task_logits is not None:
            ce = F.cross_entropy(self.task_logits.float(), self.task_labels)
            losses["router"] = config.router_loss_weight * ce
        return losses


_ACTIVE_ROUTING: ContextVar[Routing | None] = ContextVar("ctmllm_active_routing", default=None)
"""The routing of the tower forward running in this thread (contexts are per thread)."""


@contextlib.contextmanager
def routing_active(routing: Routing | None) -> Iterator[None]:
    """Make ``routing`` the one the MoE hooks read, for the duration of the block."""
    token = _ACTIVE_ROUTING.set(routing)
    try:
        yield
    finally:
        _ACTIVE_ROUTING.reset(token)


def recompute_with_same_routing() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): called when a block is
    checkpointed in the forward, it returns a context that makes that forward's routing active
    again when the block is recomputed in the backward pass."""
    return contextlib.nullcontext(), routing_active(_ACTIVE_ROUTING.get())


class TGHMoE(nn.Module):
    """The MoE of a vision tower: expert sets keyed by name, the task router, and the hooks."""

    def __init__(
        self,
        config: MoEConfig,
        family: Family,
        vision_tower: nn.Module,
        blocks: Sequence[int],
        prompt_dim: int,
    ) -> None:
        super().__init__()
        if not config.enabled:
            raise ValueError("moe.mode='none' has no MoE to build")
        tower_blocks = family.blocks(vision_tower)
        for block in blocks:
            if not 0 <= block < len(tower_blocks):
                raise ValueError(
                    f"moe.blocks contains {block}; the tower has blocks 0..{len(tower_blocks) - 1}"
                )
        self.config = config
        self.family = family
        self.block_indices = tuple(blocks)
        self.set_names = tuple(config.tasks) if config.task_level else (TOKEN_SET,)
        linears = {block: self._target_linears(tower_blocks[block]) for block in self.block_indices}
        hidden = family.vision_config.hidden_size
        self.experts = nn.ModuleDict({name: TokenMoE(config, linears, hidden) for name in self.set_names})
        self.task_router = TaskRouter(prompt_dim, len(self.set_names)) if config.task_level else None
        self._hooks: list = []

    def _target_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        sites: dict[str, nn.Linear] = {}
        if "mlp" in self.config.targets:
            sites.update(self.family.mlp_linears(block))
        if "attention" in self.config.targets:
            sites.update(self.family.attention_linears(block))
        return sites

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self, vision_tower: nn.Module) -> None:
        """Hook the tower: a pre-hook routes each MoE block's tokens, a hook on each target linear
        adds the experts' delta. Prepended, so the delta lands before any RoPE hook on the same
        linear (SigLIP's q/k projections are both LoRA targets and RoPE sites)."""
        self.detach()
        tower_blocks = self.family.blocks(vision_tower)
        for block in self.block_indices:
            module = tower_blocks[block]
            self._hooks.append(module.register_forward_pre_hook(partial(self._on_block, block)))
            for name, linear in self._target_linears(module).items():
                hook = partial(self._on_linear, block, name)  # bound methods: deepcopy rebinds them
                self._hooks.append(linear.register_forward_hook(hook, prepend=True))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _active_routing(self) -> Routing:
        routing = _ACTIVE_ROUTING.get()
        if routing is None or routing.moe is not self:
            raise MoERoutingError(
                "the MoE has no routing for this call: encode through CTMLLM.encode_volumes (or the "
                "VolumeAdapter), not the tower directly; under gradient checkpointing enable it with "
                "model_core.training.stages.enable_gradient_checkpointing, which keeps the routing"
            )
        return routing

    def _on_block(self, block: int, module: nn.Module, args: tuple) -> None:
        self._route_block(self._active_routing(), block, args[0])

    def _on_linear(
        self, block: int, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor
    ) -> torch.Tensor:
        x = inputs[0]
        for route in self._active_routing().routes.get(block, ()):
            lora = self.experts[self.set_names[route.index]].lora[f"{block}_{name}"]
            delta = lora(x if route.rows is None else x[route.rows], route.gates)
            if route.row_weight is not None:
                delta = delta * route.row_weight.to(delta.dtype)
            delta = delta.to(output.dtype)
            output = output + delta if route.rows is None else output.index_add(0, route.rows, delta)
        return output

    def _route_block(self, routing: Routing, block: int, hidden: torch.Tensor) -> None:
        """Compute the gates of every active expert set for this block call ``(n, T, C)``."""
        n = hidden.shape[0]
        weights = routing.sample_weights if routing.sample_weights is not None else hidden.new_ones(1, 1)
        if n % weights.shape[0]:
            raise MoERoutingError(f"block input has {n} rows for {weights.shape[0]} samples")
        row_weights = weights.repeat_interleave(n // weights.shape[0], dim=0)  # (n, sets)
        routes = []
        for index in range(row_weights.shape[1]):
            column = row_weights[:, index]
            active = column > 0
            if not bool(active.any()):
                continue
            rows = None if bool(active.all()) else active.nonzero().squeeze(1)
            selected = hidden if rows is None else hidden[rows]
            weight = column if rows is None else column[rows]
            exact_one = bool((weight == 1).all())
            gates, probs = self.experts[self.set_names[index]].route(block, selected)
            routes.append(_SetRoute(index, rows, None if exact_one else weight.view(-1, 1, 1), gates))
            routing.probs[(index, block)] = probs
        routing.routes[block] = routes

    # -- task routing --------------------------------------------------------------------------
    def task_index(self, task: str) -> int:
        if task not in self.set_names:
            raise MoERoutingError(
                f"task {task!r} has no expert; this model's task experts are {self.set_names}"
            )
        return self.set_names.index(task)

    def plan(
        self,
        batch: int,
        device: torch.device,
        tasks: Sequence[str] | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        labels: Sequence[str] | None = None,
    ) -> Routing:
        """The routing of one coming tower forward: each sample's task-expert weights ``(B, sets)``.

        ``tasks`` forces the experts; otherwise the router reads ``prompt_embeddings``
        ``(B, llm_hidden)``: hard mode takes its argmax, soft mode its softmax. ``labels`` (the true
        tasks) give the router's cross-entropy loss.
        """
        routing = Routing(moe=self)
        if not self.config.task_level:
            return routing
        if prompt_embeddings is not None:
            routing.task_logits = self.task_router(prompt_embeddings)  # (B, sets)
        if labels is not None and routing.task_logits is not None:
            routing.task_labels = torch.tensor([self.task_index(t) for t in labels], device=device)
        if tasks is not None:
            if len(tasks) != batch:
                raise MoERoutingError(f"got {len(tasks)} tasks for a batch of {batch} volumes")
            chosen = torch.tensor([self.task_index(t) for t in tasks], device=device)
            weights = F.one_hot(chosen, len(self.set_names)).float()
        elif routing.task_logits is None:
            raise MoERoutingError(
                "TGH-MoE picks its task expert from the prompt: pass prompt=... or force task='report'/'vqa'"
            )
        elif self.config.mode == "tgh_hard":
            chosen = routing.task_logits.argmax(dim=-1)
            weights = F.one_hot(chosen, len(self.set_names)).float()
        else:
            weights = routing.task_logits.float().softmax(dim=-1)
            chosen = weights.argmax(dim=-1)
        routing.sample_weights = weights
        routing.tasks = [self.set_names[int(i)] for i in chosen]
        return routing


def build_moe(
    config: MoEConfig, family: Family, vision_tower: nn.Module, num_blocks: int, num_3d_blocks: int
) -> TGHMoE | None:
    """The configured MoE of a tower, not yet attached (None for mode ``none``)."""
    if not config.enabled:
        return None
    blocks = config.blocks if config.blocks is not None else default_moe_blocks(num_blocks, num_3d_blocks)
    return TGHMoE(config, family, vision_tower, blocks, family.text_config.hidden_size)


def _same_experts(a: MoEConfig, b: MoEConfig) -> bool:
    fields = ("num_experts", "top_k", "rank", "alpha", "targets", "blocks")
    return all(getattr(a, name) == getattr(b, name) for name in fields)


def set_moe(model: CTMLLM, config: MoEConfig) -> None:
    """Give ``model`` the MoE ``config`` in place (what stage 2 does to the stage-1 model).

    From no MoE: a fresh one (zero delta). From a token-level MoE to a task-level one: each task
    expert starts as an exact copy of the token-level experts (the stage-2 initialisation). The
    same config keeps the current weights. Anything else is refused, since it would silently drop
    trained experts.
    """
    adapter = model.volume_adapter
    old, old_config = adapter.moe, model.config.moe
    if old is not None and old_config == config:
        return
    new = build_moe(config, model.family, model.vision_tower, adapter.num_blocks, adapter.num_3d_blocks)
    if old is not None:
        if not (old_config.mode == "token" and config.task_level and _same_experts(old_config, config)):
            raise ValueError(
                f"cannot turn moe.mode={old_config.mode!r} into {config.mode!r} with these settings: only a "
                f"token-level MoE converts, into task experts with the same num_experts, top_k, rank, alpha, "
                f"targets and blocks"
            )
        token_state = old.experts[TOKEN_SET].state_dict()
        for name in new.set_names:
            new.experts[name].load_state_dict(token_state)
    param = next(model.vision_tower.parameters())
    adapter.set_moe(new.to(device=param.device, dtype=param.dtype) if new is not None else None)
    model.config.moe = config
