"""RQ-VAE: a residual-quantized autoencoder that learns the space it quantizes.

    x (B, D) --encoder MLP--> z (B, e) --L residual codebooks--> z_q = sum_l c_l (B, e)
             --decoder MLP--> x_hat (B, D)

    loss = ||x_hat - x||^2 + sum_l ( ||sg(r_l) - c_l||^2 + beta * ||r_l - sg(c_l)||^2 )

where r_1 = z, r_{l+1} = r_l - c_l and c_l is the codeword of level l nearest to r_l (with
``sinkhorn``: the codeword a Sinkhorn-balanced assignment gives it, see ``sinkhorn_assign``). The
decoder sees z + sg(z_q - z) (straight-through estimator), so the reconstruction gradient
reaches the encoder through the non-differentiable nearest-code choice.

Codebooks start as k-means centroids of the first batch's residuals (a random start leaves
most codes dead); every ``reseed_every`` epochs, codes that no item chose during the last
epoch are moved onto random residuals of that level. Training runs on one thread and is
deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from r2led.sid.quantizers import Quantization, kmeans, total_variance


@dataclass(frozen=True)
class RqVaeConfig:
    """RQ-VAE hyper-parameters (sized for catalogues of thousands to a few million items)."""

    latent_dim: int = 32
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = 100
    batch_size: int = 512
    lr: float = 1e-3
    beta: float = 0.25  # commitment weight: how hard the encoder is pulled towards its codes
    reseed_every: int = 5  # epochs between dead-code re-seeding
    seed: int = 0
    sinkhorn: bool = False  # near-uniform code assignment at every level (training and final codes)
    sinkhorn_epsilon: float = 0.05  # entropic temperature, relative to the distances' std
    sinkhorn_iterations: int = 50


def sinkhorn_assign(dist: torch.Tensor, epsilon: float = 0.05, iterations: int = 50) -> torch.Tensor:
    """Codes for rows of squared distances dist (B, K) under a near-uniform code usage.

    Sinkhorn-Knopp on exp(-dist / (epsilon * std(dist))): alternately scale the columns to
    equal mass and the rows to 1 (in log space), then each row takes its largest entry. With a
    small epsilon a row keeps its nearest code unless that code is over-used. Returns (B,).
    """
    d = dist.double()
    logits = -(d - d.mean()) / (epsilon * d.std().clamp_min(1e-12))  # (B, K)
    for _ in range(iterations):
        logits = logits - torch.logsumexp(logits, dim=0, keepdim=True)  # every code: equal mass
        logits = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # every row: mass 1
    return logits.argmax(1)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RqVae(nn.Module):
    """Encoder MLP -> residual codebooks -> decoder MLP."""

    def __init__(self, in_dim: int, codebook: list[int], cfg: RqVaeConfig):
        super().__init__()
        self.beta = cfg.beta
        self.cfg = cfg
        self.encoder = mlp([in_dim, *cfg.hidden, cfg.latent_dim])
        self.decoder = mlp([cfg.latent_dim, *reversed(cfg.hidden), in_dim])
        self.codebooks = nn.ParameterList([nn.Parameter(torch.zeros(k, cfg.latent_dim)) for k in codebook])

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Greedy residual quantization of z (B, e).

        Returns z_q (B, e), codes (B, L), the residual entering each level [(B, e)] * L, and
        the codebook + commitment loss.
        """
        residual = z
        z_q = torch.zeros_like(z)
        codes, residuals = [], []
        vq_loss = z.new_zeros(())
        for book in self.codebooks:  # book: (K, e)
            residuals.append(residual)
            dist = (
                (residual.detach() ** 2).sum(1, keepdim=True) - 2 * residual.detach() @ book.T + (book**2).sum(1)
            )  # (B, K)
            idx = (
                sinkhorn_assign(dist, self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iterations)
                if self.cfg.sinkhorn
                else dist.argmin(1)
            )  # (B,)
            code = book[idx]  # (B, e)
            vq_loss = vq_loss + F.mse_loss(code, residual.detach()) + self.beta * F.mse_loss(residual, code.detach())
            z_q = z_q + code
            residual = residual - code.detach()
            codes.append(idx)
        return z_q, torch.stack(codes, 1), residuals, vq_loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """x (B, D) -> (loss, reconstruction loss, codes (B, L), residuals per level)."""
        z = self.encoder(x)  # (B, e)
        z_q, codes, residuals, vq_loss = self.quantize(z)
        x_hat = self.decoder(z + (z_q - z).detach())  # straight-through: (B, D)
        recon = F.mse_loss(x_hat, x)
        return recon + vq_loss, recon, codes, residuals

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int) -> None:
        """Codebook l := k-means centroids of the level-l residuals of x (B, D)."""
        residual = self.encoder(x).numpy()  # (B, e)
        for level, book in enumerate(self.codebooks):
            centroids, assign = kmeans(residual, book.shape[0], seed=seed + level)
            book.copy_(torch.from_numpy(centroids))
            residual = residual - centroids[assign]

    @torch.no_grad()
    def reseed_dead_codes(self, x: torch.Tensor, usage: list[torch.Tensor], gen: torch.Generator) -> int:
        """Move codes with zero usage onto random level-l residuals of x (B, D); returns how many."""
        _, _, residuals, _ = self.quantize(self.encoder(x))
        moved = 0
        for book, used, residual in zip(self.codebooks, usage, residuals, strict=False):
            dead = torch.nonzero(used == 0).ravel()
            if len(dead):
                pick = torch.randint(len(residual), (len(dead),), generator=gen)
                book[dead] = residual[pick]
                moved += len(dead)
        return moved


def train_rq_vae(
    x: np.ndarray, codebook: list[int], cfg: RqVaeConfig | None = None, progress: bool = False
) -> Quantization:
    """Train an RQ-VAE on embeddings x (N, D) and return the items' codes (N, L).

    Inputs are centred and scaled to unit variance per entry (one scale for all dimensions,
    so the geometry is kept). ``residual_variance`` is measured in the latent space and
    ``reconstruction_error`` in the input space (fraction of variance the decoder misses).
    Training runs on one thread: the MLP is too small to gain from more, and the codes then do
    not depend on the machine's core count. The global RNG and thread count are restored.
    """
    cfg = cfg or RqVaeConfig()
    x = np.asarray(x, dtype=np.float32)
    scale = float(np.sqrt(total_variance(x) / x.size)) or 1.0
    data = torch.from_numpy((x - x.mean(axis=0)) / scale).float()  # (N, D), unit variance per entry
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, reseeded = _fit(data, codebook, cfg, progress)
        model.eval()
        with torch.no_grad():
            z = model.encoder(data)  # (N, e)
            z_q, codes, residuals, _ = model.quantize(z)
            x_hat = model.decoder(z_q)  # (N, D)
            chosen = [book[codes[:, level]] for level, book in enumerate(model.codebooks)]  # [(N, e)] * L
    finally:
        torch.set_num_threads(threads)
    denom = max(total_variance(z.double().numpy()), 1e-12)
    left = [float(((r - c).double() ** 2).sum()) / denom for r, c in zip(residuals, chosen, strict=False)]
    recon = float(((x_hat - data).double() ** 2).sum()) / max(total_variance(data.numpy()), 1e-12)
    params = {**asdict(cfg), "hidden": list(cfg.hidden), "reseeded_codes": reseeded, "residual_space": "latent"}
    return Quantization(codes.numpy().astype(np.int64), [round(v, 6) for v in left], round(recon, 6), params)


def _fit(data: torch.Tensor, codebook: list[int], cfg: RqVaeConfig, progress: bool) -> tuple[RqVae, int]:
    """The training loop on data (N, D); returns the model and how many dead codes were re-seeded."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    n = data.shape[0]
    # k-means initialisation wants ~40 points per code: the first batch is at least that big.
    batch_size = min(n, max(cfg.batch_size, 40 * max(codebook)))
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RqVae(data.shape[1], codebook, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.randperm(n, generator=gen)
    model.init_codebooks(data[order[:batch_size]], seed=cfg.seed)
    reseeded = 0
    columns = [
        TextColumn("rq-vae"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.epochs, loss=float("nan"))
        for epoch in range(cfg.epochs):
            usage = [torch.zeros(k, dtype=torch.long) for k in codebook]  # codes used this epoch
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss, _, codes, _ = model(data[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                for level, k in enumerate(codebook):
                    usage[level] += torch.bincount(codes[:, level], minlength=k)
            if epoch < cfg.epochs - 1 and (epoch + 1) % cfg.reseed_every == 0:
                sample = torch.randperm(n, generator=gen)[: max(batch_size, 1024)]
                reseeded += model.reseed_dead_codes(data[sample], usage, gen)
            order = torch.randperm(n, generator=gen)
            bar.update(task, advance=1, loss=total / n)
    return model, reseeded
