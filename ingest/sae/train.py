"""TopK SAE training on SmolLM2's attention inputs (``blocks.L.ln1.hook_normalized``), saved in the
sae-lens format.

Architecture: TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
arXiv:2406.04093): encode relu(topk(W_enc (x - b_dec) + b_enc)), decode with unit-norm decoder
rows, plus the AuxK loss on the top dead latents to revive them. TopK fixes L0 exactly, which
also fixes the ingest cost (A^2 feature pairs per (q, k)).

Why a plain loop and not sae-lens' trainer: sae-lens' runner builds its model with
``HookedTransformer.from_pretrained(model_name)`` and streams a Hugging Face dataset; neither
works offline for a model converted by hand from a GGUF file. The loop below is the same
objective, and its output loads with ``sae_lens.SAE.load_from_disk``.

Phases: (1) collect activations with a model truncated after the last SAE layer (position 0,
the attention sink, is left out); (2) train one SAE per layer on shuffled activations;
(3) save in sae-lens format (fp16) with a metrics JSON. The same command runs on CPU or GPU.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..registry import SAE_DIR, shipped_hook as hook_name


@dataclass(frozen=True)
class SAETrainConfig:
    corpus: Path = Path("data/corpus.parquet")
    out_dir: Path = SAE_DIR / "smollm2-135m"
    layers: tuple[int, ...] = (17, 18)
    d_sae: int = 4096
    k: int = 32
    n_tokens: int = 600_000  # training activations collected per layer
    samples_seen: int = 3_000_000  # training steps x batch size
    batch_size: int = 1024
    lr: float = 5e-4
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_after: int = 200_000  # tokens without firing before a latent counts as dead (AuxK)
    seed: int = 0
    device: str = "cpu"
    max_tokens: int = 128

    def __post_init__(self):
        if self.k <= 0 or self.k > self.d_sae:
            raise ValueError(f"k must be in [1, d_sae], got k={self.k}, d_sae={self.d_sae}")
        if not self.layers:
            raise ValueError("give at least one layer")
        if self.n_tokens < self.batch_size:
            raise ValueError("n_tokens must be at least one batch")


def collect_activations(model, token_lists, layers, n_tokens, device, batch_size=32, progress=True):
    """[n_tokens, d_model] fp16 activations per layer, position 0 excluded."""
    import torch
    from tqdm import tqdm

    from ..corpus import padded_batches

    names = [hook_name(l) for l in layers]
    out = {l: [] for l in layers}
    got = 0
    bar = tqdm(total=n_tokens, desc="activations", unit="tok", disable=not progress)
    for _, toks, mask in padded_batches(token_lists, batch_size):
        mask[:, 0] = False  # the attention sink is left out
        with torch.no_grad():
            _, cache = model.run_with_cache(
                toks.to(device), names_filter=lambda n: n in names, stop_at_layer=max(layers) + 1
            )
        for l, n in zip(layers, names):
            out[l].append(cache[n][mask.to(device)].half().cpu())
        got += int(mask.sum())
        bar.update(int(mask.sum()))
        if got >= n_tokens:
            break
    bar.close()
    return {l: torch.cat(v)[:n_tokens] for l, v in out.items()}


def make_topk_sae(d_in: int, d_sae: int, k: int, layer: int):
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = hook_name(layer)
    cfg.metadata.model_name = "smollm2-135m"
    cfg.metadata.hook_head_index = None
    cfg.metadata.context_size = 128
    cfg.metadata.prepend_bos = True
    return TopKSAE(cfg)


@dataclass
class TrainResult:
    layer: int
    seconds: float
    steps: int
    final_mse: float
    history: list = field(default_factory=list)


def train_one(acts, cfg: SAETrainConfig, layer: int, progress=True):
    """Train a TopK SAE on fp16 activations [N, d]; returns (sae-lens TopKSAE, TrainResult)."""
    import torch
    from tqdm import tqdm

    device = cfg.device
    g = torch.Generator().manual_seed(cfg.seed + layer)
    N, d = acts.shape
    torch.manual_seed(cfg.seed + layer)
    W_dec = torch.randn(cfg.d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    sample = acts[torch.randperm(N, generator=g)[:20_000]].float()
    params = {
        "W_dec": W_dec.to(device).requires_grad_(),
        "W_enc": W_dec.T.detach().clone().to(device).requires_grad_(),
        "b_enc": torch.zeros(cfg.d_sae, device=device, requires_grad=True),
        "b_dec": sample.median(0).values.to(device).requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    steps = cfg.samples_seen // cfg.batch_size
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (1.0 if s < 0.8 * steps else (steps - s) / (0.2 * steps))
    )
    since_fired = torch.zeros(cfg.d_sae, device=device)
    var = sample.var(0).sum().item()
    perm = torch.randperm(N, generator=g)
    acts_dev = acts.to(device)
    history, t0, pos = [], time.time(), 0
    bar = tqdm(range(steps), desc=f"train L{layer}", disable=not progress)
    for step in bar:
        if pos + cfg.batch_size > N:
            perm, pos = torch.randperm(N, generator=g), 0
        x = acts_dev[perm[pos : pos + cfg.batch_size].to(device)].float()
        pos += cfg.batch_size
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        vals, idx = pre.topk(cfg.k, dim=-1)
        vals = vals.relu()
        recon = torch.einsum("bk,bkd->bd", vals, params["W_dec"][idx]) + params["b_dec"]
        err = x - recon
        mse = err.pow(2).sum(-1).mean()
        fired = torch.zeros(cfg.d_sae, device=device, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + cfg.batch_size)
        dead = since_fired > cfg.dead_after
        loss = mse
        n_dead = int(dead.sum())
        if n_dead > 0:  # AuxK: let the top dead latents model the residual error
            aux_pre = pre.masked_fill(~dead, -math.inf)
            a_vals, a_idx = aux_pre.topk(min(cfg.aux_k, n_dead), dim=-1)
            a_vals = a_vals.relu()
            aux_recon = torch.einsum("bk,bkd->bd", a_vals, params["W_dec"][a_idx])
            aux = (err.detach() - aux_recon).pow(2).sum(-1).mean()
            loss = loss + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep decoder rows unit norm; remove the gradient along them
            Wd = params["W_dec"]
            Wd.grad -= (Wd.grad * Wd).sum(-1, keepdim=True) * Wd
        opt.step()
        sched.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
        if step % 100 == 0 or step == steps - 1:
            fve = 1 - mse.item() / var
            history.append({"step": step, "mse": mse.item(), "fve": fve, "dead": n_dead})
            bar.set_postfix(fve=f"{fve:.3f}", dead=n_dead)
    sae = make_topk_sae(d, cfg.d_sae, cfg.k, layer)
    with torch.no_grad():
        for name, p in params.items():
            getattr(sae, name).copy_(p.detach().cpu())
    return sae.eval(), TrainResult(layer, time.time() - t0, steps, history[-1]["mse"], history)


def save_sae(sae, path: Path, dtype="float16") -> None:
    """sae-lens format (cfg.json + sae_weights.safetensors), written to a staging dir first."""
    import shutil

    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    sae = sae.to(getattr(torch, dtype))
    sae.cfg.dtype = dtype
    sae.save_model(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def run(cfg: SAETrainConfig, progress: bool = True) -> dict:
    """Collect activations, train and save one SAE per layer. Returns the training metrics."""
    import torch

    from ..corpus import read_corpus, tokenize_samples
    from ..registry import load_smollm2

    torch.manual_seed(cfg.seed)
    lm = load_smollm2(device=cfg.device, n_layers=max(cfg.layers) + 1)
    table = read_corpus(cfg.corpus, split="train")
    order = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(cfg.seed))
    need = int(cfg.n_tokens / 60) + 64  # samples average well over 60 tokens
    texts = [table["text"][int(i)].as_py() for i in order[:need]]
    tokens = tokenize_samples(texts, lm.tokenizer, lm.bos_id, cfg.max_tokens)
    t0 = time.time()
    acts = collect_activations(lm.model, tokens, cfg.layers, cfg.n_tokens, cfg.device, progress=progress)
    collect_s = time.time() - t0
    del lm
    metrics = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
               "collect_seconds": collect_s, "layers": {}}
    for layer in cfg.layers:
        sae, res = train_one(acts[layer], cfg, layer, progress=progress)
        save_sae(sae, cfg.out_dir / hook_name(layer))
        metrics["layers"][str(layer)] = {
            "train_seconds": res.seconds, "steps": res.steps, "n_train_tokens": int(acts[layer].shape[0]),
            "final_train_fve": res.history[-1]["fve"], "history": res.history,
        }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
