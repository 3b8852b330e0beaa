"""TopK SAE training on SmolLM2's attention inputs (``blocks.L.ln1.hook_normalized``), streamed
from the corpus and saved in the sae-lens format.

Architecture: TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
arXiv:2406.04093): encode relu(topk(W_enc (x - b_dec) + b_enc)), decode with unit-norm decoder
rows, plus the AuxK loss on the top dead latents to revive them. TopK fixes L0 exactly, which
also fixes the ingest cost (k^2 feature pairs per (q, k)).

Objectives (each a fraction of unexplained variance, so they add on one scale):
- ``mse``: |x - x_hat|^2 / E|x - E x|^2, the plain reconstruction loss;
- ``qk``: that plus `qk_coef` |(x - x_hat) M|^2 / E|(x - E x) M|^2 with M the layer's query and
  key maps (`metrics.attention_maps`: norm weight times W_Q and W_K of every head). The SAE is
  still a plain TopK SAE; only what its error costs during training changes.

Streaming: one truncated forward pass (the model stops at the last SAE layer's norm) yields the
activations of every layer; they go through a shuffle buffer per layer and every SAE variant
trains on the same batches, so nothing is stored and a grid of variants costs one collection.
Collection runs under bf16 autocast by default (`precision`); the run measures its error against
fp32 on held-out text and records it in the metrics.

Checkpoints (`checkpoint.pt` in `out_dir`) hold every trainer's state and the stream position,
so a training budget can be spread over several runs (`--resume`, `--max-seconds`).

Why a plain loop and not sae-lens' trainer: sae-lens' runner builds its model with
``HookedTransformer.from_pretrained(model_name)`` and streams a Hugging Face dataset; neither
works offline for a model converted by hand from a GGUF file. Its output loads with
``sae_lens.SAE.load_from_disk``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import opt
from ..registry import SAE_DIR
from ..registry import shipped_hook as hook_name

OBJECTIVES = ("mse", "qk")


@dataclass(frozen=True)
class Variant:
    d_sae: int
    k: int
    objective: str

    @classmethod
    def parse(cls, text: str) -> "Variant":
        try:
            size, objective = text.split(":")
            d_sae, k = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"a variant looks like WIDTHxK:OBJECTIVE, e.g. 4096x64:qk; got {text!r}") from None
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r} in {text!r}")
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, width], got {text!r}")
        return cls(d_sae, k, objective)

    def __str__(self) -> str:
        return f"{self.d_sae}x{self.k}:{self.objective}"

    @property
    def dirname(self) -> str:
        return f"{self.d_sae}x{self.k}-{self.objective}"


@dataclass(frozen=True)
class SAETrainConfig:
    model: str = opt("smollm2-135m", "model preset: smollm2-135m or gemma3-270m (opt-in install)")
    corpus: Path = opt(Path("data/corpus.parquet"), "corpus built by `fra corpus build`; its train split is used")
    out_dir: Path = opt(
        SAE_DIR / "smollm2-135m",
        "output: one sae-lens directory per hook; with several variants, one subdirectory per variant",
    )
    layers: tuple[int, ...] = opt((17, 18), "layers whose attention input (blocks.L.ln1.hook_normalized) gets an SAE")
    variants: tuple[str, ...] = opt(
        ("4096x64:qk",),
        "SAEs trained side by side on the same activations, as "
        "WIDTHxK:OBJECTIVE; objective mse (plain reconstruction) or qk (adds the error "
        "seen through the layer's W_Q and W_K)",
    )
    n_tokens: int = opt(10_000_000, "corpus tokens to collect per layer (position 0 left out)")
    reuse: int = opt(1, "times each activation is trained on, on average (a replay buffer): more steps per token")
    batch_size: int = opt(4096, "activations per training step")
    lr: float = opt(
        4e-4,
        "Adam learning rate (short warm-up, then linear decay to zero over the last 20%% of "
        "the token budget, or of --max-seconds when that runs out first)",
    )
    qk_coef: float = opt(1.0, "weight of the attention term of the qk objective, relative to the MSE term")
    aux_k: int = opt(256, "dead latents used by the AuxK loss")
    aux_coef: float = opt(1 / 32, "weight of the AuxK loss")
    dead_after: int = opt(1_000_000, "tokens without firing before a latent counts as dead (for AuxK)")
    precision: str = opt(
        "bf16",
        "matmuls of the activation collection and of training: bf16 (autocast, fp32 "
        "weights and optimiser; about 2.6x faster on this CPU) or fp32",
    )
    buffer_tokens: int = opt(2**18, "shuffle buffer per layer: activations mixed across samples before training")
    batch_samples: int = opt(16, "corpus samples per forward pass")
    chunk_samples: int = opt(
        1024, "samples tokenised and sorted by length together (less padding); checkpoints fall between chunks"
    )
    eval_every: int = opt(1_000_000, "tokens between points of the metrics-against-tokens curve")
    heldout_tokens: int = opt(32_768, "held-out activations per layer for the curve (and the bf16 check)")
    max_seconds: float | None = opt(
        None,
        "time budget of this run: the learning rate decays over its last 20%%, "
        "then the run checkpoints and saves the SAEs (continue with --resume)",
    )
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice, one per core)")
    resume: bool = opt(False, "continue from out_dir/checkpoint.pt (same variants and layers)")
    seed: int = opt(0, "seed of the sample order, the initialisation and the batches")
    device: str = opt("cpu", "torch device")
    max_tokens: int = opt(128, "tokens per sample (BOS included), as in the index")
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self):
        if not self.layers:
            raise ValueError("give at least one layer")
        if not self.variants:
            raise ValueError("give at least one variant, e.g. --variants 4096x64:qk")
        self.parsed_variants  # noqa: B018 (validates)
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.n_tokens < self.batch_size or self.buffer_tokens < self.batch_size:
            raise ValueError("n_tokens and buffer_tokens must each hold at least one batch")
        if self.reuse < 1:
            raise ValueError("--reuse must be >= 1")

    @property
    def parsed_variants(self) -> list[Variant]:
        return [Variant.parse(v) for v in self.variants]

    def sae_dir(self, variant: Variant, layer: int) -> Path:
        base = self.out_dir if len(self.variants) == 1 else self.out_dir / variant.dirname
        return base / hook_name(layer)


def make_topk_sae(d_in: int, d_sae: int, k: int, layer: int, model_name: str = "smollm2-135m"):
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = hook_name(layer)
    cfg.metadata.model_name = model_name
    cfg.metadata.hook_head_index = None
    cfg.metadata.context_size = 128
    cfg.metadata.prepend_bos = True
    return TopKSAE(cfg)


class TopKTrainer:
    """One TopK SAE under training: parameters, Adam state, dead-latent clock, schedule."""

    def __init__(
        self,
        variant: Variant,
        layer: int,
        cfg: SAETrainConfig,
        sample_ND,
        qk_DM,
        total_steps: int,
        model_name: str = "smollm2-135m",
    ):
        import torch

        self.variant, self.layer, self.cfg, self.total_steps = variant, layer, cfg, total_steps
        self.model_name = model_name
        g = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
        d = sample_ND.shape[1]
        W_dec = torch.randn(variant.d_sae, d, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.params = {
            "W_enc": W_dec.T.clone(),
            "W_dec": W_dec,
            "b_enc": torch.zeros(variant.d_sae),
            "b_dec": sample_ND.median(0).values.clone(),
        }
        self.opt = torch.optim.Adam(self.params.values(), lr=cfg.lr)
        self.qk_DM = qk_DM if variant.objective == "qk" else None
        centred = sample_ND - sample_ND.mean(0)
        self.var_x = centred.pow(2).sum(-1).mean().item()
        self.var_qk = (centred @ qk_DM).pow(2).sum(-1).mean().item()
        self.since_fired = torch.zeros(variant.d_sae)
        self.step = 0

    def lr_scale(self, progress: float) -> float:
        """Warm-up over the first 5% of the steps planned (at most 1,000), then constant, then a
        linear decay to zero over the last 20% of the run; `progress` in [0, 1] is how much of
        the token or time budget is spent, whichever is further."""
        warm = max(1, min(1000, self.total_steps // 20))
        return min(1.0, (self.step + 1) / warm) * min(1.0, max(0.0, (1 - progress) / 0.2))

    def _matmul_precision(self):
        import contextlib

        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.precision == "bf16" else contextlib.nullcontext()

    def train_step(self, x_ND, progress: float = 0.0) -> dict:
        """One Adam step. The gradient is written out by hand so that only the encoder's
        pre-activations and the decoder's pull-back are dense [N, d_sae] products; everything
        else touches the k active latents of each row (sparse matmuls). `tests/test_sae_train.py`
        checks it against autograd."""
        import torch

        W_enc, W_dec, b_enc, b_dec = (self.params[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
        N, F = len(x_ND), self.variant.d_sae
        xc = x_ND - b_dec
        with self._matmul_precision():
            pre = (xc @ W_enc + b_enc).float()
        vals, idx = pre.topk(self.variant.k, dim=-1)
        acts = vals.relu()
        rows = torch.arange(N).repeat_interleave(self.variant.k)
        cols, a = idx.reshape(-1), acts.reshape(-1)
        recon = _csr(torch.arange(0, N * self.variant.k + 1, self.variant.k), cols, a, (N, F)) @ W_dec + b_dec
        err = x_ND - recon
        mse = err.pow(2).sum(-1).mean()
        g = err * (-2 / (N * self.var_x))  # d loss / d recon
        if self.qk_DM is not None:
            g -= (err @ self.qk_DM) @ self.qk_DM.T * (2 * self.cfg.qk_coef / (N * self.var_qk))
        gW_dec = _transpose_matmul(rows, cols, a, F, g)
        gb_dec = g.sum(0)
        with self._matmul_precision():
            g_acts = (g @ W_dec.T).float().gather(1, idx) * (vals > 0)
        enc_rows, enc_cols, enc_vals = [rows], [cols], [g_acts.reshape(-1)]

        fired = torch.zeros(F, dtype=torch.bool)
        fired[cols[a > 0]] = True
        self.since_fired = torch.where(fired, torch.zeros_like(self.since_fired), self.since_fired + N)
        dead = (self.since_fired > self.cfg.dead_after).nonzero()[:, 0]
        if len(dead):  # AuxK: the top dead latents model the residual error
            a_vals, a_idx = pre[:, dead].topk(min(self.cfg.aux_k, len(dead)), dim=-1)
            A = torch.zeros(N, len(dead)).scatter(1, a_idx, a_vals.relu())
            e2 = err - A @ W_dec[dead]
            g2 = e2 * (-2 * self.cfg.aux_coef / (N * self.var_x))  # d loss / d aux reconstruction
            gW_dec[dead] += A.T @ g2
            g_aux = (g2 @ W_dec[dead].T).gather(1, a_idx) * (a_vals > 0)
            enc_rows.append(torch.arange(N).repeat_interleave(a_idx.shape[1]))
            enc_cols.append(dead[a_idx].reshape(-1))
            enc_vals.append(g_aux.reshape(-1))
        rows, cols, g_pre = torch.cat(enc_rows), torch.cat(enc_cols), torch.cat(enc_vals)
        gb_enc = torch.zeros(F).index_add_(0, cols, g_pre)
        W_enc.grad = _transpose_matmul(rows, cols, g_pre, F, xc).T.contiguous()
        b_enc.grad = gb_enc
        b_dec.grad = gb_dec - W_enc @ gb_enc  # pre = (x - b_dec) W_enc + b_enc
        # unit-norm decoder rows: no gradient along them, renormalised after the step
        W_dec.grad = gW_dec - (gW_dec * W_dec).sum(-1, keepdim=True) * W_dec
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * self.lr_scale(progress)
        self.opt.step()
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.step += 1
        return {"fve": 1 - mse.item() / self.var_x, "dead": len(dead)}

    def to_sae(self):
        import torch

        sae = make_topk_sae(
            self.params["W_dec"].shape[1], self.variant.d_sae, self.variant.k, self.layer, self.model_name
        )
        with torch.no_grad():
            for name, v in self.params.items():
                getattr(sae, name).copy_(v.detach())
        return sae.eval()

    def state_dict(self) -> dict:
        return {
            "params": {k: v.detach() for k, v in self.params.items()},
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "step": self.step,
            "var_x": self.var_x,
            "var_qk": self.var_qk,
        }

    def load_state_dict(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
        self.opt.load_state_dict(state["opt"])
        self.since_fired, self.step = state["since_fired"], state["step"]
        self.var_x, self.var_qk = state["var_x"], state["var_qk"]


def _csr(crow, cols, vals, shape):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def _transpose_matmul(rows, cols, vals, n_out: int, dense_ND):
    """M^T @ dense for the sparse [N, n_out] matrix M with entries (rows, cols, vals); repeated
    entries add. Returns [n_out, D]."""
    import torch

    order = cols.argsort()
    crow = torch.zeros(n_out + 1, dtype=torch.long)
    crow[1:] = torch.bincount(cols, minlength=n_out).cumsum(0)
    return _csr(crow, rows[order], vals[order], (n_out, len(dense_ND))) @ dense_ND


class _StopForward(Exception):
    pass


class ActivationStream:
    """Batches of SAE inputs of every layer from one truncated forward pass per batch of samples
    (position 0, the attention sink, and padding left out)."""

    def __init__(self, model, layers, precision: str, device: str):
        self.model, self.layers, self.precision, self.device = model, sorted(layers), precision, device
        self.names = [hook_name(l) for l in self.layers]

    def __call__(self, toks_BT, mask_BT) -> dict:
        import contextlib

        import torch

        got = {}

        def grab(x, hook):
            got[hook.name] = x.float()
            if len(got) == len(self.names):
                raise _StopForward  # nothing after the last SAE layer's norm is needed

        hooks = [(n, grab) for n in self.names]
        cast = (
            torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        keep = mask_BT.clone()
        keep[:, 0] = False
        with torch.no_grad(), cast:
            try:
                self.model.run_with_hooks(toks_BT.to(self.device), fwd_hooks=hooks, stop_at_layer=max(self.layers) + 1)
            except _StopForward:
                pass
        keep = keep.to(self.device)
        return {l: got[n][keep].cpu() for l, n in zip(self.layers, self.names)}


class ShuffleBuffer:
    """A ring buffer of activations; batches are drawn uniformly from what it holds."""

    def __init__(self, capacity: int, d: int, generator):
        import torch

        self.data = torch.empty(capacity, d, dtype=torch.float16)
        self.capacity, self.size, self.head, self.g = capacity, 0, 0, generator

    def add(self, x_ND) -> None:
        n = min(len(x_ND), self.capacity)
        x_ND = x_ND[-n:]
        end = self.head + n
        first = min(end, self.capacity) - self.head
        self.data[self.head : self.head + first] = x_ND[:first].half()
        self.data[: n - first] = x_ND[first:].half()
        self.head = end % self.capacity
        self.size = min(self.capacity, self.size + n)

    def batch(self, n: int):
        import torch

        return self.data[torch.randint(0, self.size, (n,), generator=self.g)].float()


def _chunks(cfg: SAETrainConfig, tokenizer, bos_id: int, start_chunk: int):
    """(chunk index, token lists sorted by length) over the train split in a seeded order."""
    import torch

    from ..corpus import read_corpus, tokenize_samples

    table = read_corpus(cfg.corpus, split="train")
    order = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    texts = table["text"]
    for c in range(start_chunk, math.ceil(len(order) / cfg.chunk_samples)):
        ids = order[c * cfg.chunk_samples : (c + 1) * cfg.chunk_samples]
        toks = tokenize_samples([texts[i].as_py() for i in ids], tokenizer, bos_id, cfg.max_tokens)
        yield c, sorted(toks, key=len)


def heldout_activations(
    model,
    layers,
    tokenizer,
    bos_id,
    corpus,
    n_tokens: int,
    precision: str,
    device: str,
    max_tokens: int = 128,
    seed: int = 0,
):
    """[n_tokens, d] SAE inputs per layer from the held-out split (fixed order), for the curve."""
    import random

    import torch

    from ..corpus import padded_batches, read_corpus, tokenize_samples

    table = read_corpus(corpus, split="heldout")
    idx = list(range(table.num_rows))
    random.Random(seed).shuffle(idx)
    toks = tokenize_samples(
        [table["text"][i].as_py() for i in idx[: n_tokens // 40 + 16]], tokenizer, bos_id, max_tokens
    )
    stream = ActivationStream(model, layers, precision, device)
    out = {l: [] for l in layers}
    got = 0
    for _, t, m in padded_batches(toks, 16):
        acts = stream(t, m)
        for l in layers:
            out[l].append(acts[l])
        got += len(acts[layers[0]])
        if got >= n_tokens:
            break
    return {l: torch.cat(v)[:n_tokens] for l, v in out.items()}


def curve_point(trainer: TopKTrainer, model, x_ND, maps, bos_id: int) -> dict:
    """Held-out FVE, QK variance explained, TIH feature share and dead latents of a trainer now."""
    import torch

    from .metrics import qk_variance_explained, tih_feature_share, tih_heads

    sae = trainer.to_sae()
    with torch.no_grad():
        recon = sae.decode(sae.encode(x_ND))
    centred = x_ND - x_ND.mean(0)
    qk = qk_variance_explained(maps, x_ND, recon)
    heads = tih_heads(trainer.layer, trainer.model_name)
    tih = tih_feature_share(model, trainer.layer, sae, heads, bos_id) if heads else {"mean_ff_share": None}
    return {
        "fve": 1 - (x_ND - recon).pow(2).sum().item() / centred.pow(2).sum().item(),
        "qk_ve_q": qk["q_mean"],
        "qk_ve_k": qk["k_mean"],
        "qk_ve_min": qk["min"],
        "tih_ff_share": tih["mean_ff_share"],
        "dead_fraction": float((trainer.since_fired > trainer.cfg.dead_after).float().mean()),
    }


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


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


def _comparable(cfg: SAETrainConfig) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    return {
        k: v
        for k, v in _plain(cfg).items()
        if k in ("layers", "variants", "seed", "batch_size", "chunk_samples", "corpus")
    }


def _plain(cfg: SAETrainConfig) -> dict:
    return {
        k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
    }


def _resume_state(cfg: SAETrainConfig, ckpt_path: Path) -> dict | None:
    """The checkpoint to continue (--resume), after checking it was made with the same settings."""
    import torch

    if not cfg.resume:
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or remove it to start over")
        return None
    if not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    state = torch.load(ckpt_path, weights_only=False)
    if state["comparable"] != _comparable(cfg):
        raise ValueError(
            f"--resume: the checkpoint was made with {state['comparable']}, this run has {_comparable(cfg)}"
        )
    return state


def _precision_check(cfg: SAETrainConfig, lm, heldout: dict) -> dict:
    """Per layer, the relative error of the bf16 collection against fp32 on the held-out tokens."""
    if cfg.precision != "bf16":
        return {}
    low = heldout_activations(
        lm.model,
        cfg.layers,
        lm.tokenizer,
        lm.bos_id,
        cfg.corpus,
        cfg.heldout_tokens,
        "bf16",
        cfg.device,
        cfg.max_tokens,
    )
    out = {}
    for l in cfg.layers:
        rel = (low[l] - heldout[l]).norm(dim=-1) / heldout[l].norm(dim=-1)
        out[str(l)] = {
            "rel_err_median": rel.median().item(),
            "rel_err_p999": rel.quantile(0.999).item(),
            "rel_err_max": rel.max().item(),
            "n_tokens": len(rel),
        }
    return out


class _TrainingRun:
    """One `fra train-sae` run: the trainers of every (variant, layer), the stream position, the
    curve, and the checkpoint that lets a later run continue where this one stopped."""

    def __init__(self, cfg: SAETrainConfig, lm):
        import torch

        from .metrics import attention_maps

        self.cfg, self.lm, self.t_start = cfg, lm, time.time()
        self.layers, self.variants = sorted(cfg.layers), cfg.parsed_variants
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = cfg.out_dir / "checkpoint.pt"
        state = _resume_state(cfg, self.ckpt_path)
        self.maps = {l: attention_maps(lm.model, l) for l in self.layers}
        self.heldout = heldout_activations(
            lm.model,
            self.layers,
            lm.tokenizer,
            lm.bos_id,
            cfg.corpus,
            cfg.heldout_tokens,
            "fp32",
            cfg.device,
            cfg.max_tokens,
        )
        total_steps = math.ceil(cfg.n_tokens * cfg.reuse / cfg.batch_size)
        self.trainers = {
            (str(v), l): TopKTrainer(v, l, cfg, self.heldout[l], self.maps[l].qk_DM, total_steps, lm.name)
            for v in self.variants
            for l in self.layers
        }
        self.tokens, self.next_chunk, self.curve, self.seconds_before = 0, 0, [], 0.0
        if state is None:
            self.precision_check = _precision_check(cfg, lm, self.heldout)
        else:
            for key, tr in self.trainers.items():
                tr.load_state_dict(state["trainers"][f"{key[0]}@{key[1]}"])
                tr.total_steps = total_steps
            self.tokens, self.next_chunk = state["tokens"], state["next_chunk"]
            self.curve, self.seconds_before = state["curve"], state["seconds"]
            self.precision_check = state["precision_check"]
        g = torch.Generator().manual_seed(cfg.seed + 7 + self.next_chunk)
        self.buffers = {l: ShuffleBuffer(cfg.buffer_tokens, lm.model.cfg.d_model, g) for l in self.layers}
        self.stream = ActivationStream(lm.model, self.layers, cfg.precision, cfg.device)
        self.timing = {"collect": 0.0, "train": 0.0}

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.t_start

    def checkpoint(self) -> None:
        _atomic_save(
            {
                "comparable": _comparable(self.cfg),
                "tokens": self.tokens,
                "next_chunk": self.next_chunk,
                "curve": self.curve,
                "seconds": self.seconds(),
                "precision_check": self.precision_check,
                "trainers": {f"{k[0]}@{k[1]}": tr.state_dict() for k, tr in self.trainers.items()},
            },
            self.ckpt_path,
        )

    def add_curve_point(self) -> None:
        row = {"tokens": self.tokens, "seconds": self.seconds(), "sae": {}}
        for (v, l), tr in self.trainers.items():
            row["sae"][f"{v}@{l}"] = curve_point(tr, self.lm.model, self.heldout[l], self.maps[l], self.lm.bos_id)
        self.curve.append(row)

    def train_chunk(self, chunk) -> dict:
        """Collect a chunk's activations into the shuffle buffers, then take the chunk's share of
        steps (`reuse` passes over its tokens) for every variant; returns the last step's info."""
        from ..corpus import padded_batches

        cfg, t0, fresh = self.cfg, time.time(), 0
        for _, toks, mask in padded_batches(chunk, cfg.batch_samples):
            acts = self.stream(toks, mask)
            for l in self.layers:
                self.buffers[l].add(acts[l])
            fresh += len(acts[self.layers[0]])
        t1 = time.time()
        n_steps = max(1, round(fresh * cfg.reuse / cfg.batch_size))
        for step in range(n_steps):
            progress = (self.tokens + fresh * step / n_steps) / cfg.n_tokens
            if cfg.max_seconds:
                progress = max(progress, (time.time() - self.t_start) / cfg.max_seconds)
            for l in self.layers:
                x = self.buffers[l].batch(cfg.batch_size)
                for v in self.variants:
                    info = self.trainers[(str(v), l)].train_step(x, progress)
        self.timing["collect"] += t1 - t0
        self.timing["train"] += time.time() - t1
        self.tokens += fresh
        return info

    def train(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.n_tokens, initial=self.tokens, desc="train-sae", unit="tok", disable=not cfg.progress)
        next_eval = (self.tokens // cfg.eval_every + 1) * cfg.eval_every
        for c, chunk in _chunks(cfg, self.lm.tokenizer, self.lm.bos_id, self.next_chunk):
            if self.tokens >= cfg.n_tokens:
                break
            before = self.tokens
            info = self.train_chunk(chunk)
            self.next_chunk = c + 1
            bar.update(self.tokens - before)
            bar.set_postfix(fve=f"{info['fve']:.3f}", dead=info["dead"])
            if self.tokens >= next_eval or self.tokens >= cfg.n_tokens:
                self.add_curve_point()
                next_eval += cfg.eval_every
                self.checkpoint()
            if cfg.max_seconds is not None and time.time() - self.t_start > cfg.max_seconds:
                break
        bar.close()
        if not self.curve or self.curve[-1]["tokens"] != self.tokens:
            self.add_curve_point()
        self.checkpoint()

    def save(self) -> dict:
        for (v, l), tr in self.trainers.items():
            save_sae(tr.to_sae(), self.cfg.sae_dir(Variant.parse(v), l))
        metrics = {
            "config": _plain(self.cfg),
            "tokens_per_layer": self.tokens,
            "finished": self.tokens >= self.cfg.n_tokens,
            "seconds": self.seconds(),
            "this_run": self.timing,
            "precision_check": self.precision_check,
            "steps": {f"{v}@{l}": tr.step for (v, l), tr in self.trainers.items()},
            "curve": self.curve,
        }
        (self.cfg.out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=1))
        return metrics


def run(cfg: SAETrainConfig, lm=None) -> dict:
    """Stream activations, train every variant on every layer, checkpoint, save; returns the
    metrics written to `out_dir/train_metrics.json`."""
    import torch

    from ..registry import load_gemma3, load_smollm2

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaders = {"smollm2-135m": load_smollm2, "gemma3-270m": load_gemma3}
    if lm is None and cfg.model not in loaders:
        raise ValueError(f"--model {cfg.model!r}: SAE training supports {', '.join(loaders)}")
    lm = lm or loaders[cfg.model](device=cfg.device, n_layers=max(cfg.layers) + 1)
    training = _TrainingRun(cfg, lm)
    training.train()
    return training.save()
