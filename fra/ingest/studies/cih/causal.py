"""Downstream causal check of headline findings: the log-probability of X after B.

In "... the A X ... the B" an induction mechanism predicts X as the token after B. For each
headline finding, on the test prompts of the first seed, the finding's channel contributions are
subtracted from its head's scores at B's row inside the forward pass (a hook on
hook_attn_scores, so the model re-applies its own softmax and runs on), and the change in
log P(X | prompt) is compared with subtracting the head's SAE-error terms instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .measure import GROUPS


@dataclass(frozen=True)
class LogProbEffect:
    relation: str
    layer: int
    feat_q: int
    feat_k: int
    head: int
    n_prompts: int
    logp_x: float  # mean log P(X) at B, unedited
    delta_channel: float  # mean change when the channel is removed from the head's scores at B
    delta_error: float  # mean change when the SAE-error terms are removed instead


@torch.no_grad()
def _logp_x(model, prompts, layer: int, head: int, delta_BT) -> torch.Tensor:
    toks = torch.tensor([p.tokens for p in prompts], device=model.cfg.device)
    q = prompts[0].q_pos

    def edit(scores, hook):
        if delta_BT is not None:
            scores[:, head, q, : delta_BT.shape[1]] -= delta_BT.to(scores.dtype)
        return scores

    logits = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.attn.hook_attn_scores", edit)])
    x_tok = torch.tensor([p.tokens[p.x_pos] for p in prompts])
    return logits[:, -1].log_softmax(-1).gather(1, x_tok[:, None].to(logits.device))[:, 0].cpu()


def logprob_effects(setup, cfg, finding, prompts) -> LogProbEffect:
    """`finding`: an aggregated Finding; `prompts`: the relation's prompts of one seed."""
    from .study import batches, measure_batch

    layer, head = finding.layer, int(finding.best_head.split(".")[1])
    key = torch.tensor([finding.feat_q * setup.saes[layer].cfg.d_sae + finding.feat_k])
    gen = torch.Generator().manual_seed(0)
    base, d_ch, d_err = [], [], []
    test = [p for p in prompts if p.half == 1 and p.role == "concept"]
    for batch in batches(test, cfg.batch_size):
        rows, _ = measure_batch(setup, batch, {L: key for L in setup.layers}, 1, gen)
        r = rows[layer]
        ch = torch.stack([row.units_UHT[0, head] for row in r])
        err = torch.stack([row.groups_GHT[GROUPS.index("err"), head] for row in r])
        lp0 = _logp_x(setup.model, batch, layer, head, None)
        base.append(lp0)
        d_ch.append(_logp_x(setup.model, batch, layer, head, ch) - lp0)
        d_err.append(_logp_x(setup.model, batch, layer, head, err) - lp0)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0)  # noqa: E731
    base, d_ch, d_err = cat(base), cat(d_ch), cat(d_err)
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
    return LogProbEffect(
        finding.relation,
        layer,
        finding.feat_q,
        finding.feat_k,
        head,
        int(base.numel()),
        mean(base),
        mean(d_ch),
        mean(d_err),
    )
