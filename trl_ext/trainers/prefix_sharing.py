"""Prefix sharing (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv
2410.20305): each preference pair's prompt goes through the model once instead of twice.

TRL's DPO runs each model on `[chosen; rejected]` rows, `2B` rows of `L` positions, so every prompt is computed twice.
With prefix sharing the model's backbone runs instead on `B` shared rows `[prefix | chosen rest | rejected rest]`: the
longest common prefix of the pair's two rows (the prompt, and any completion tokens the two share) once, then the
rest of each row, with an attention mask in which each rest sees the prefix and its own earlier tokens but never the
other rest, and position ids that restart where the prefix ends for the rejected rest. Every position then computes
exactly what it computes in its own row. The backbone's last hidden states are gathered back into TRL's `(2B, L)`
rows, so TRL's fused LM head, its losses and metrics, and trl_ext's losses run unchanged on the same numbers.

The rewrite happens at the backbone's boundary, by forward hooks, only inside `PrefixSharing.active()` (the trainer
opens it around TRL's loss and reference precompute): generation and every other forward are untouched.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..trl_contract import TRLContractError, attention_implementation, lm_backbone

PREFIX, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
# Attention implementations that take the custom mask shared rows need (`attn_implementation`)
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class SharedRows:
    """A batch of `B` pairs laid out one row per pair, `S` positions, and the way back to TRL's `2B` rows.

    `input_ids`, `position_ids`, `segments` (`PREFIX`, `CHOSEN`, `REJECTED` or `PADDING` at each position) are
    `(B, S)`; `source` is `(2B, L)`: for each position of TRL's rows, its index in the flattened `(B * S)` shared
    positions (a padding position points at a real one of its pair: TRL ignores what it holds).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    source: torch.Tensor


def share_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SharedRows:
    """Lays TRL's right-padded `[chosen; rejected]` rows out one row per pair.

    Args:
        input_ids: `(2B, L)` the chosen rows, then the rejected rows of the same pairs, right-padded.
        attention_mask: `(2B, L)` 1 on real tokens.

    Returns:
        The [`SharedRows`]: pair `i` is `chosen[:s] + chosen[s:lc] + rejected[s:lr]`, `s` the length of the longest
        common prefix of its two rows, `lc` and `lr` their lengths, padded on the right to the longest pair.
    """
    pairs, width = input_ids.size(0) // 2, input_ids.size(1)
    chosen, rejected = input_ids[:pairs], input_ids[pairs:]
    chosen_length, rejected_length = attention_mask.sum(dim=1).view(2, pairs)
    same = (chosen == rejected) & attention_mask[:pairs].bool() & attention_mask[pairs:].bool()
    prefix = same.long().cumprod(dim=1).sum(dim=1)  # (B,)
    shared_length = chosen_length + rejected_length - prefix
    positions = torch.arange(int(shared_length.max()), device=input_ids.device).expand(pairs, -1)

    in_rejected = positions >= chosen_length[:, None]
    # Index into the pair's own TRL row: chosen positions as they are, rejected ones shifted back by the chosen rest
    rejected_index = (positions - chosen_length[:, None] + prefix[:, None]).clamp(0, width - 1)
    chosen_index = positions.clamp(max=width - 1)
    shared_ids = torch.where(in_rejected, rejected.gather(1, rejected_index), chosen.gather(1, chosen_index))
    position_ids = torch.where(in_rejected, rejected_index, positions)
    segments = torch.full_like(positions, PADDING)
    segments = torch.where(positions < shared_length[:, None], REJECTED, segments)
    segments = torch.where(positions < chosen_length[:, None], CHOSEN, segments)
    segments = torch.where(positions < prefix[:, None], PREFIX, segments)
    position_ids = torch.where(segments == PADDING, 0, position_ids)

    # TRL position t of the chosen row is shared position t; of the rejected row, t before the prefix's end, else the
    # rejected rest's start (the chosen row's end) plus t - prefix. Padding points at the row's last real token.
    row_positions = torch.arange(width, device=input_ids.device).expand(pairs, -1)
    chosen_source = row_positions.clamp(max=chosen_length[:, None] - 1)
    rejected_source = torch.where(row_positions < prefix[:, None], row_positions,
                                  chosen_length[:, None] + row_positions - prefix[:, None])
    rejected_source = rejected_source.clamp(max=shared_length[:, None] - 1)
    row_start = torch.arange(pairs, device=input_ids.device)[:, None] * positions.size(1)
    source = torch.cat([chosen_source + row_start, rejected_source + row_start])
    return SharedRows(shared_ids, position_ids, segments, source)


def allowed_attention(segments: torch.Tensor) -> torch.Tensor:
    """`(B, 1, S, S)` bool: query `q` may attend key `k` when `k <= q` and `k` is in the prefix or in `q`'s own
    segment. Padding attends padding (never a real token), so no query row is fully masked."""
    positions = torch.arange(segments.size(1), device=segments.device)
    causal = positions[None, :] <= positions[:, None]
    same_or_prefix = (segments[:, None, :] == PREFIX) | (segments[:, None, :] == segments[:, :, None])
    return (causal & same_or_prefix)[:, None]


def attention_mask_for(rows: SharedRows, implementation: str, dtype: torch.dtype):
    """The attention mask of `rows` in the form `implementation` takes: a boolean mask for SDPA, an additive float
    mask for eager attention, a block-sparse `BlockMask` for FlexAttention (blocks no query may see are skipped)."""
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        segments = rows.segments

        def mask_mod(batch, head, query, key):
            key_segment = segments[batch, key]
            return (key <= query) & ((key_segment == PREFIX) | (key_segment == segments[batch, query]))

        size = segments.size(1)
        return create_block_mask(mask_mod, segments.size(0), None, size, size, device=segments.device)
    allowed = allowed_attention(rows.segments)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    return allowed


def unshare(hidden_states: torch.Tensor, rows: SharedRows) -> torch.Tensor:
    """`(B, S, H)` hidden states of the shared rows, gathered into TRL's `(2B, L, H)` rows (differentiable: a prefix
    position's gradient is the sum of its two rows')."""
    flat = hidden_states.reshape(-1, hidden_states.size(-1))
    return flat.index_select(0, rows.source.reshape(-1)).view(*rows.source.shape, -1)


class PrefixSharing:
    """Runs the backbones of `models` on shared rows while `active()` is open, handing back TRL's rows."""

    def __init__(self, models: list[torch.nn.Module]):
        # Each backbone takes the mask in the form of its own attention (a reference may run another than the policy)
        self.implementations = {lm_backbone(model): attention_implementation(model) for model in models}
        self.pending: list[SharedRows] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        # First among the backbone's hooks, so that every other one sees TRL's rows (and their outputs)
        handles = [hook for backbone in self.implementations for hook in (
            backbone.register_forward_pre_hook(self._share, with_kwargs=True, prepend=True),
            backbone.register_forward_hook(self._unshare, prepend=True),
        )]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.pending.clear()

    def _share(self, module, args, kwargs):
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if args or input_ids is None or attention_mask is None or attention_mask.dim() != 2 \
                or kwargs.get("position_ids") is not None or input_ids.size(0) % 2:
            raise TRLContractError(
                "prefix sharing expected TRL's backbone forward on `[chosen; rejected]` rows (`input_ids` and a 2D "
                "`attention_mask` by keyword, no `position_ids`), but got another call: set `prefix_sharing=False`."
            )
        rows = share_prefixes(input_ids, attention_mask)
        self.pending.append(rows)
        # The embeddings' dtype is the one the layers compute in (FSDP1's flat parameters leave the backbone no
        # parameter of its own to read `module.dtype` from)
        dtype = module.get_input_embeddings().weight.dtype
        mask = attention_mask_for(rows, self.implementations[module], dtype)
        return args, {**kwargs, "input_ids": rows.input_ids, "attention_mask": mask, "position_ids": rows.position_ids}

    def _unshare(self, module, args, output):
        output.last_hidden_state = unshare(output.last_hidden_state, self.pending.pop())
        return output


def check_prefix_sharing_can_run(model: torch.nn.Module, max_length: int | None, aux_loss_enabled: bool,
                                 sharded: bool = False) -> None:
    """Refuses, before training, what shared rows cannot reproduce exactly: attention that takes no custom mask,
    prompt-learning PEFT (its virtual tokens come first in every row), a sliding window the rows may exceed, MoE
    router logits (the load-balancing loss would count the shared rows' tokens against TRL's mask), vision-language
    models (their image tokens), and a model whose forward ignores the mask or the position ids (a probe on a short
    synthetic pair, when the weights are here: not under FSDP (`sharded`), where only the wrapper may run the model,
    nor with ZeRO-3's partitioned parameters)."""
    fix = "or set `prefix_sharing=False`."
    implementation = attention_implementation(model)
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"`prefix_sharing=True` needs an attention implementation that takes a custom mask "
                         f"({', '.join(SUPPORTED_ATTENTION)}); this model runs `{implementation}`. Load it with "
                         f"`attn_implementation='sdpa'` (`model_init_kwargs` or `--attn_implementation sdpa`), {fix}")
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        raise ValueError(f"`prefix_sharing=True` cannot share prompts under prompt-learning PEFT "
                         f"(`{peft_config.peft_type}`), which puts virtual tokens before each row: use LoRA, {fix}")
    config = model.config
    text_config = config.get_text_config()
    if text_config is not config:
        raise ValueError(f"`prefix_sharing=True` supports text-only models; `{config.model_type}` also reads images: "
                         f"{fix}")
    window = getattr(text_config, "sliding_window", None)
    if window is not None and getattr(text_config, "use_sliding_window", True) and (max_length or window + 1) > window:
        raise ValueError(f"`prefix_sharing=True` builds one attention mask for all layers, without this model's "
                         f"sliding window of {window} tokens: set `max_length` <= {window}, {fix}")
    if aux_loss_enabled or getattr(text_config, "output_router_logits", False):
        raise ValueError(f"`prefix_sharing=True` would hand the MoE load-balancing loss the router logits of shared "
                         f"rows, counted against TRL's: set `router_aux_loss_coef=0` and the model config's "
                         f"`output_router_logits=False`, {fix}")
    if not sharded and not any(parameter.device.type == "meta" or parameter.numel() == 0
                               for parameter in model.parameters()):
        _probe(model, fix)


def _probe(model: torch.nn.Module, fix: str) -> None:
    """Refuses a model whose shared forward differs from its plain one on a short synthetic pair."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 6, 7, 8]], device=device)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], device=device)
    backbone = lm_backbone(model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            with PrefixSharing([model]).active():
                shared = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    finally:
        model.train(training)
    real = attention_mask.bool()
    plain, shared = plain[real].float(), shared[real].float()
    tolerance = (1e-4 if plain.dtype == torch.float32 and backbone.dtype == torch.float32 else 5e-2)
    if (shared - plain).abs().max() > tolerance * max(1.0, plain.abs().max().item()):
        raise ValueError(f"`prefix_sharing=True`: this model's forward does not honour the custom attention mask and "
                         f"position ids of shared rows (a probe pair's hidden states differ from its plain forward's), "
                         f"{fix}")
