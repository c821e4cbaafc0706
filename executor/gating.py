"""Masked gating (paper section 3.2, Fig. 5) and expert importance (Eq. 1).

``MaskedRouter`` wraps a model's own router. It always runs the original
router first, so with every expert resident its output is the original's,
bit for bit; when some experts are absent it re-selects from the same raw
logits with the absent experts excluded. Importance is accumulated from the
*unmasked* choice, so experts that are wanted but absent still count.

Legend: T = tokens, E = experts, K = experts per token, H = hidden size.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import torch
from torch import nn

from swapmoe.core.plan import Strategy
from swapmoe.executor.slot_experts import call

# (router, raw logits [T, E], resident [E] bool) -> (weights [T, K], index [T, K])
Select = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def select_softmax_topk(router: nn.Module, logits: torch.Tensor, resident: torch.Tensor):
    """Mixtral, Qwen2/3-MoE, OLMoE: softmax over resident experts, top-k, optional renormalization."""
    probs = torch.softmax(logits.masked_fill(~resident, float("-inf")), dim=-1, dtype=torch.float)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return top_value.to(logits.dtype), _absent_to_sentinel(top_index, resident)


def select_sigmoid_group_topk(router: nn.Module, logits: torch.Tensor, resident: torch.Tensor):
    """DeepSeek-V3: sigmoid scores with bias correction and group-limited top-k, over resident experts."""
    scores = logits.float().sigmoid()
    choice = (scores + router.e_score_correction_bias).masked_fill(~resident, float("-inf"))
    per_group = router.num_experts // router.num_group
    grouped = choice.view(-1, router.num_group, per_group)
    group_scores = grouped.topk(min(2, per_group), dim=-1)[0].nan_to_num(neginf=-1e30).sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
    choice = choice.masked_fill(~group_mask.repeat_interleave(per_group, dim=-1), float("-inf"))
    index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, _absent_to_sentinel(index, resident)


def _absent_to_sentinel(index: torch.Tensor, resident: torch.Tensor) -> torch.Tensor:
    """Picks of absent experts (when fewer than K are resident) become ``E``, which experts skip."""
    return torch.where(resident[index], index, resident.numel())


class MaskedRouter(nn.Module):
    """Wraps a packed-experts router (``forward(hidden) -> (logits, weights, index)``)."""

    def __init__(self, router: nn.Module, select: Select, expert_norms: torch.Tensor):
        super().__init__()
        self.router = router
        self.select = select
        self.register_buffer("expert_norms", expert_norms.float(), persistent=False)  # [E]: ||E_i||
        # ||E_i|| with 0 for the "no expert" index E, as ``flush`` weighs contributions.
        self.register_buffer("_norms_padded", torch.nn.functional.pad(expert_norms.double(), (0, 1)),
                             persistent=False)
        self.register_buffer("resident", torch.ones_like(expert_norms, dtype=torch.bool), persistent=False)
        self.all_resident = True
        # What happens to an assignment to an absent expert: masked gating re-selects among
        # resident experts (Fig. 5), skip drops it, on demand passes every choice on (the
        # experts module loads what is missing).
        self.strategy = Strategy.MASKED_GATING
        # Called with each pass's hidden state after routing (the on-demand prefetch guesses the
        # next layer's experts from it); None: nothing to call.
        self.after_route: Callable[[torch.Tensor], None] | None = None
        num_experts = expert_norms.numel()
        self.num_experts = num_experts  # MoE blocks read these from their router
        self.top_k = getattr(router, "top_k", 1)
        # Cumulative counters with one extra entry for the "no expert" index E, so recording needs
        # no masking; per-pass contributions wait in ``_pending`` and are summed when read.
        self.register_buffer("_activations", torch.zeros(num_experts + 1, dtype=torch.long), persistent=False)
        self.register_buffer("_importance", torch.zeros(num_experts + 1, dtype=torch.double), persistent=False)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (index, ||x||, weights)
        # Passes record on the forward thread while the expert updater reads importance: the
        # hand-over of ``_pending`` and the sums each take a lock (the first for a list swap only).
        self._handover = threading.Lock()
        self._sums = threading.Lock()

    def mask(self, experts: Iterable[int]) -> torch.Tensor:
        """The resident mask [E] for ``experts`` (distinct ids); any thread."""
        flags = [False] * self.num_experts
        for expert in experts:
            flags[expert] = True
        return torch.tensor(flags, device=self.resident.device)

    def install(self, mask: torch.Tensor) -> None:
        """Route only to the experts ``mask`` marks, from the next forward pass on."""
        self.resident = mask
        self.all_resident = bool(mask.all())

    def forward(self, hidden: torch.Tensor):
        logits, weights, index = call(self.router, hidden)
        self.record(hidden, weights, index)
        if self.after_route is not None:
            self.after_route(hidden)
        if self.all_resident or self.strategy is Strategy.ON_DEMAND:
            return logits, weights, index
        if self.strategy is Strategy.SKIP:
            return logits, weights, _absent_to_sentinel(index, self.resident)
        weights, index = self.select(self.router, logits.reshape(hidden.numel() // hidden.shape[-1], -1),
                                     self.resident)
        return logits, weights, index

    @torch.inference_mode()
    def guess(self, hidden: torch.Tensor) -> list[int]:
        """The experts the unmodified router picks for ``hidden``, most tokens first (ties: most probable
        first), recording nothing: another layer's hidden state asks what this layer will need. The
        router's own forward, not its hooks: transformers' output recorders would report the guess
        as one of the model's routings (``output_router_logits``)."""
        logits, _, index = self.router.forward(hidden)
        return _most_routed(torch.bincount(index.reshape(-1), minlength=self.num_experts + 1)[:-1], logits)

    def record(self, hidden: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> None:
        """Eq. 1: importance_i += sum over tokens routed to i of ||x|| * |G(x)_i| * ||E_i||.
        A pass only takes ||x|| (one op: this runs in every MoE layer of every pass, with every
        expert resident too); the products and sums wait for ``flush``."""
        if hidden.requires_grad:  # no graph kept alive until the flush (inference passes need no detach)
            hidden, weights = hidden.detach(), weights.detach()
        norm = torch.linalg.vector_norm(hidden, dim=-1, keepdim=True, dtype=torch.float32)  # [..., 1]: T rows
        with self._handover:
            self._pending.append((index, norm, weights))  # [T, K], [..., 1], [T, K]
            full = len(self._pending) >= 64
        if full:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        with self._handover:
            pending, self._pending = self._pending, []
        if not pending:
            return
        index = torch.cat([i for i, _, _ in pending]).reshape(-1)
        norms = torch.cat([n.reshape(-1, 1) for _, n, _ in pending])  # [T, 1]
        weights = torch.cat([w for _, _, w in pending])
        contrib = (norms * weights.float().abs()).reshape(-1).double()
        with self._sums:
            self._activations.index_add_(0, index, torch.ones_like(index))
            self._importance.index_add_(0, index, contrib * self._norms_padded[index])

    @property
    def importance(self) -> torch.Tensor:
        """Cumulative importance per expert [E] (paper Eq. 1)."""
        self.flush()
        return self._importance[:-1]

    @property
    def activations(self) -> torch.Tensor:
        """Cumulative tokens routed per expert [E] (by the unmasked router)."""
        self.flush()
        return self._activations[:-1]

    def stats(self) -> tuple[list[int], list[float]]:
        """Cumulative activations and importance per expert; readers take differences."""
        return self.activations.tolist(), self.importance.tolist()


def _most_routed(tokens: torch.Tensor, logits: torch.Tensor) -> list[int]:
    """The experts with tokens ([E]: tokens per expert), most first; ties (one token picks several):
    the most probable first by the router's ``logits`` [..., E] (mean over tokens; then lower index)."""
    counts = tokens.tolist()
    probability = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1).mean(dim=0).tolist()
    return sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], -probability[e], e))


class MaskedTop1Router(MaskedRouter):
    """Switch Transformers: ``forward(hidden [B,S,H]) -> (dispatch one-hot [B,S,E], prob [B,S,1], logits)``."""

    @torch.inference_mode()
    def guess(self, hidden: torch.Tensor) -> list[int]:
        dispatch, _, logits = self.router.forward(hidden)  # not its hooks (see MaskedRouter.guess)
        return _most_routed(dispatch.reshape(-1, dispatch.shape[-1]).sum(dim=0), logits)

    def forward(self, hidden: torch.Tensor):
        dispatch, probs, logits = call(self.router, hidden)
        chosen = dispatch.argmax(dim=-1)
        routed = dispatch.sum(dim=-1) > 0  # tokens within capacity
        index = torch.where(routed, chosen, self.expert_norms.numel()).reshape(-1, 1)
        self.record(hidden.reshape(-1, hidden.shape[-1]), probs.reshape(-1, 1), index)
        if self.after_route is not None:
            self.after_route(hidden)
        if self.all_resident or self.strategy is Strategy.ON_DEMAND:
            return dispatch, probs, logits
        if self.strategy is Strategy.SKIP:
            return dispatch * self.resident.to(dispatch.dtype), probs, logits
        router = self.router
        masked = logits.masked_fill(~self.resident, float("-inf"))
        masked_probs = torch.softmax(masked, dim=-1, dtype=router.dtype).to(hidden.dtype)
        one_hot = nn.functional.one_hot(masked_probs.argmax(dim=-1), num_classes=router.num_experts)
        one_hot = one_hot * (torch.cumsum(one_hot, dim=-2) <= router.expert_capacity)
        return one_hot, masked_probs.max(dim=-1).values.unsqueeze(-1), logits
