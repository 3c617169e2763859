"""Batched neighbour embeddings: every head of a layer in one torch program, layouts (head, point, 2).

Both methods start from each head's exact kNN graph (`knn_graph_batch`, one bmm per row block):
- t-SNE: perplexity-calibrated P on k = min(3 * perplexity, n - 1) neighbours (batched bisection),
  symmetrised by applying each directed edge's force to both ends; attraction over the edges;
  repulsion and its normaliser Z estimated from `negatives` uniform samples per point and iteration;
  early exaggeration, momentum and gains as in scikit-learn; PCA init scaled to std 1e-4.
- UMAP: umap's rho/sigma calibration and fuzzy union, the a/b curve for min_dist, expected-value
  edge sampling (each edge's attraction weighted by w / w_max every epoch, negatives in proportion),
  umap's gradient clipping and linearly decaying learning rate; PCA init scaled to +-10.

Heads of one call must have the same point count. Device-agnostic: tensors follow `device`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch


def _dev(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class _cpu_threads:
    """On CPU, run the optimisation loops with ATTNATLAS_TORCH_THREADS threads (default 1): on the shared
    2-core machine, 2 OpenMP threads made these small elementwise kernels ~5-10x slower (spin-waits under load)."""

    def __init__(self, dev: torch.device):
        self.on = dev.type == "cpu"

    def __enter__(self):
        if self.on:
            import os

            self.saved = torch.get_num_threads()
            torch.set_num_threads(int(os.environ.get("ATTNATLAS_TORCH_THREADS", "1")))

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.saved)


def knn_graph_batch(X: np.ndarray, k: int, metric: str = "cosine", device: str | None = None,
                    block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of every head at once: X (head, point, d) -> idx (head, point, k) int64 (head-local,
    self first) and dist (head, point, k) float32, the same values `quality.knn_graph` gives per head."""
    dev = _dev(device)
    H, n, _ = X.shape
    k = min(k, n)
    Z = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(dev)
    if metric == "cosine":
        Z = torch.nn.functional.normalize(Z, dim=2)
    sq = (Z * Z).sum(2)  # (head, point)
    idx = np.empty((H, n, k), dtype=np.int64)
    dist = np.empty((H, n, k), dtype=np.float32)
    # Row blocks keep the (head, block, point) similarity tensor to ~H * block * n floats.
    block = max(64, min(block, int(4e8 // max(1, H * n))))
    for a in range(0, n, block):
        b = min(n, a + block)
        S = torch.bmm(Z[:, a:b], Z.transpose(1, 2))  # (head, block, point)
        if metric == "euclidean":
            S = 2 * S - sq[:, None, :]
        rows = torch.arange(a, b, device=dev)
        S[:, rows - a, rows] = float("inf")  # self first even among duplicates
        v, i = torch.topk(S, k, dim=2)
        d = (1 - v).clamp_min(0) if metric == "cosine" else (sq[:, a:b, None] - v).clamp_min(0).sqrt()
        d[:, :, 0] = 0
        idx[:, a:b] = i.cpu().numpy()
        dist[:, a:b] = d.cpu().numpy()
    return idx, dist


def pca_init(X: torch.Tensor, metric: str) -> torch.Tensor:
    """(head, point, d) -> (head, point, 2) first two principal components per head, sign-fixed."""
    Z = torch.nn.functional.normalize(X, dim=2) if metric == "cosine" else X
    Z = Z - Z.mean(1, keepdim=True)
    C = Z.transpose(1, 2) @ Z  # (head, d, d): cheaper than an SVD of (point, d)
    _, V = torch.linalg.eigh(C.double())
    V = V[:, :, [-1, -2]].to(Z.dtype)  # (head, d, 2) largest first
    # Deterministic sign: largest-magnitude loading positive (like sklearn's svd_flip).
    s = torch.sign(torch.gather(V, 1, V.abs().argmax(1, keepdim=True)))
    return Z @ (V * s)


def _bisect(f, target: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-element bisection in log space for increasing f: f(x) ~ target."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        up = f(mid.exp()) < target
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return ((lo + hi) / 2).exp()


def tsne_affinities(dist: torch.Tensor, perplexity: float, metric: str, steps: int = 48) -> torch.Tensor:
    """dist (head, point, k) to the k non-self neighbours -> conditional P (head, point, k), rows sum 1."""
    # Squared euclidean; on unit rows that is 2 x cosine distance (calibration absorbs the factor anyway).
    D = 2 * dist if metric == "cosine" else dist * dist
    D = D - D[:, :, :1]  # shift per row: P is unchanged, exp never underflows to all-zero
    target = math.log(perplexity)

    def entropy(beta: torch.Tensor) -> torch.Tensor:  # decreasing in beta; we bisect on -entropy
        P = torch.exp(-D * beta[..., None])
        s = P.sum(2)
        return -(torch.log(s) + beta * (D * P).sum(2) / s)

    shape = D.shape[:2]
    lo = torch.full(shape, -30.0, device=D.device)
    hi = torch.full(shape, 30.0, device=D.device)
    scale = D[:, :, -1].clamp_min(1e-12)  # search beta * max distance: scale-free bounds
    beta = _bisect(lambda b: entropy(b / scale), torch.full(shape, -target, device=D.device), lo, hi, steps) / scale
    P = torch.exp(-D * beta[..., None])
    return P / P.sum(2, keepdim=True)


def tsne_batch(X: np.ndarray, knn_idx: np.ndarray, knn_dist: np.ndarray, metric: str = "cosine",
               perplexity: float = 50.0, max_iter: int = 400, early_iter: int = 200,
               early_exaggeration: float = 12.0, negatives: int = 64, seed: int = 0,
               init: np.ndarray | None = None, device: str | None = None, exact_below: int = 0) -> np.ndarray:
    """t-SNE of every head: X (head, point, d), knn (head, point, >= k + 1) self first -> (head, point, 2).

    Heads of at most `exact_below` points get exact repulsion (every pair, in row blocks) instead of `negatives`
    samples.
    With `init` (e.g. the neighbouring head's layout) the caller passes a shorter `max_iter`/`early_iter`."""
    dev = _dev(device)
    with _cpu_threads(dev):
        return _tsne(X, knn_idx, knn_dist, metric, perplexity, max_iter, early_iter, early_exaggeration,
                     negatives, seed, init, dev, exact_below)


def _exact_repulsion(x: torch.Tensor, y: torch.Tensor, H: int, n: int, budget: int = 1 << 25):
    """Every pair's repulsion: x, y (head * point) -> (rx, ry) (head * point) of sum_j q_ij^2 (y_i - y_j), and
    Z = sum_ij q_ij (head,), with q unnormalised; in row blocks of about `budget` pair values."""
    X, Y = x.view(H, n), y.view(H, n)
    rx, ry = torch.empty_like(X), torch.empty_like(Y)
    z = torch.zeros(H, dtype=x.dtype, device=x.device)
    step = max(1, budget // max(1, H * n))
    for a in range(0, n, step):
        b = min(n, a + step)
        dx = X[:, a:b, None] - X[:, None, :]  # (head, block, point)
        dy = Y[:, a:b, None] - Y[:, None, :]
        q = (dx * dx).add_(dy * dy).add_(1.0).reciprocal_()
        z += q.sum((1, 2)) - (b - a)  # minus the diagonal (q_ii = 1)
        q.square_()
        rx[:, a:b], ry[:, a:b] = (q * dx).sum(2), (q * dy).sum(2)
    return rx, ry, z


def _tsne(X, knn_idx, knn_dist, metric, perplexity, max_iter, early_iter, early_exaggeration, negatives, seed,
          init, dev, exact_below=0) -> np.ndarray:
    H, n, _ = X.shape
    k = int(min(3 * perplexity, n - 1))
    perplexity = min(perplexity, max(1.0, k / 3.0))
    g = torch.Generator(device=dev).manual_seed(seed)
    idx = torch.from_numpy(np.ascontiguousarray(knn_idx[:, :, 1 : k + 1])).to(dev)
    P = tsne_affinities(torch.from_numpy(np.ascontiguousarray(knn_dist[:, :, 1 : k + 1])).to(dev), perplexity, metric)
    W = (P / (2 * n)).unsqueeze(-1)  # (head, point, k, 1): symmetric P = sum of both directions / 2n
    base = (torch.arange(H, device=dev) * n).view(H, 1, 1)
    jg = (idx + base).reshape(-1)  # flat (head * point) index of each edge's far end
    if init is None:
        Y = pca_init(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(dev), metric)
        Y = Y / Y[:, :, :1].std(1, keepdim=True).clamp_min(1e-12) * 1e-4  # sklearn's PCA init scale
    else:
        Y = torch.from_numpy(np.asarray(init, np.float32)).to(dev)
        Y = Y / Y[:, :, :1].std(1, keepdim=True).clamp_min(1e-12) * 1e-4
    Y = Y.contiguous()
    lr = max(n / early_exaggeration / 4, 50.0)  # sklearn's learning_rate="auto" (n / 12 made sampled repulsion diverge)
    exact = n <= exact_below
    # Coordinates as two flat (head * point) vectors: torch's CPU kernels reduce a trailing dim of 2 slowly.
    x, y = Y[:, :, 0].reshape(-1).clone(), Y[:, :, 1].reshape(-1).clone()
    ux, uy = torch.zeros_like(x), torch.zeros_like(y)  # momentum updates
    gx, gy = torch.ones_like(x), torch.ones_like(y)  # gains
    rows = torch.arange(n, device=dev).view(1, n, 1)
    w = W.squeeze(-1)  # (head, point, k)
    for it in range(max_iter):
        exag, mom = (early_exaggeration, 0.5) if it < early_iter else (1.0, 0.8)
        dx = x.view(H, n, 1) - x[jg].view(H, n, k)  # (head, point, k)
        dy = y.view(H, n, 1) - y[jg].view(H, n, k)
        f = (dx * dx).add_(dy * dy).add_(1.0).reciprocal_().mul_(w)  # p_ij q_ij (unnormalised)
        fx, fy = f * dx, f.mul_(dy)
        ax, ay = fx.sum(2).view(-1), fy.sum(2).view(-1)  # pull on the near end ...
        ax.index_add_(0, jg, fx.view(-1), alpha=-1.0)  # ... and on the far end
        ay.index_add_(0, jg, fy.view(-1), alpha=-1.0)
        if exact:
            rep_x, rep_y, z = _exact_repulsion(x, y, H, n)
            zs = z.view(H, 1)
        else:
            s = (torch.randint(0, n, (H, n, negatives), generator=g, device=dev) + base).view(-1)
            rx = x.view(H, n, 1) - x[s].view(H, n, negatives)
            ry = y.view(H, n, 1) - y[s].view(H, n, negatives)
            qr = (rx * rx).add_(ry * ry).add_(1.0).reciprocal_().mul_(s.view(H, n, negatives) != rows + base)
            # Z ~ n (n - 1) mean(q); repulsion_i ~ (n - 1) mean_s(q^2 diff) / Z, so (n - 1) cancels.
            zs = (qr.sum((1, 2)) / negatives).view(H, 1)  # Z / (n - 1), per head
            q2 = qr.square_()
            rep_x, rep_y = (q2 * rx).sum(2) / negatives, (q2 * ry).sum(2) / negatives
        gx_ = 4.0 * (exag * ax.view(H, n) - rep_x / zs).view(-1)
        gy_ = 4.0 * (exag * ay.view(H, n) - rep_y / zs).view(-1)
        for p_, u_, g_, d_ in ((x, ux, gx, gx_), (y, uy, gy, gy_)):
            inc = (u_ * d_) < 0  # sign change: grow the gain
            g_.copy_(torch.where(inc, g_ + 0.2, g_ * 0.8).clamp_min_(0.01))
            u_.mul_(mom).sub_(lr * g_ * d_)
            p_.add_(u_)
    Y = torch.stack([x.view(H, n), y.view(H, n)], 2)
    return Y.cpu().numpy().astype(np.float32)


@lru_cache(maxsize=8)
def find_ab(spread: float = 1.0, min_dist: float = 0.1) -> tuple[float, float]:
    """a, b of 1 / (1 + a d^2b) fitted to umap's target curve; same fit as umap's find_ab_params,
    without importing umap (whose import alone costs seconds of numba start-up)."""
    from scipy.optimize import curve_fit

    x = np.linspace(0, spread * 3, 300)
    y = np.where(x < min_dist, 1.0, np.exp(-(x - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2 * b)), x, y)
    return float(a), float(b)


def umap_graph(knn_idx: np.ndarray, knn_dist: np.ndarray, n_neighbors: int, n_epochs: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuzzy union graph of every head as directed edges (each pair both ways), src-sorted:
    src, dst flat (head * point) indices and weight / head max, edges below max / n_epochs dropped."""
    H, n, _ = knn_idx.shape
    kk = n_neighbors  # umap counts self among n_neighbors
    d = torch.from_numpy(np.ascontiguousarray(knn_dist[:, :, 1:kk], dtype=np.float32)).to(device)
    j = torch.from_numpy(np.ascontiguousarray(knn_idx[:, :, 1:kk])).to(device)
    rho = d[:, :, :1]  # local_connectivity 1: the nearest non-self distance
    dd = (d - rho).clamp_min(0)
    target = torch.full(d.shape[:2], math.log2(kk), device=device)
    scale = d.mean(2).clamp_min(1e-12)
    sigma = _bisect(lambda s: torch.exp(-dd / (s * scale)[..., None]).sum(2), target,
                    torch.full_like(target, -20.0), torch.full_like(target, 10.0), 40) * scale
    sigma = torch.maximum(sigma, 1e-3 * d.mean((1, 2), keepdim=True).squeeze(-1))  # umap's MIN_K_DIST_SCALE
    w = torch.exp(-dd / sigma[..., None]).reshape(-1)
    h = torch.arange(H, device=device).view(H, 1, 1).expand_as(j).reshape(-1)
    i = torch.arange(n, device=device).view(1, n, 1).expand_as(j).reshape(-1)
    j = j.reshape(-1)
    key, rkey = (h * n + i) * n + j, (h * n + j) * n + i
    order = torch.argsort(key)
    skey, sw = key[order], w[order]
    pos = torch.searchsorted(skey, rkey).clamp_max(len(skey) - 1)
    has_rev = skey[pos] == rkey
    wr = torch.where(has_rev, sw[pos], torch.zeros_like(w))
    u = w + wr - w * wr  # fuzzy union
    # Each pair both ways: kNN edges, plus the reverse of those whose reverse is not a kNN edge.
    src = torch.cat([h * n + i, (h * n + j)[~has_rev]])
    dst = torch.cat([h * n + j, (h * n + i)[~has_rev]])
    wt = torch.cat([u, u[~has_rev]])
    hh = torch.cat([h, h[~has_rev]])
    wmax = torch.zeros(H, device=device).scatter_reduce(0, hh, wt, "amax")
    wt = wt / wmax[hh]
    keep = wt >= 1.0 / n_epochs
    src, dst, wt = src[keep], dst[keep], wt[keep]
    o = torch.argsort(src, stable=True)
    return src[o], dst[o], wt[o]


def umap_batch(X: np.ndarray, knn_idx: np.ndarray, knn_dist: np.ndarray, metric: str = "cosine",
               n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int = 400, negative_sample_rate: float = 5.0,
               negatives: int = 16, learning_rate: float = 1.0, seed: int = 0, init: np.ndarray | None = None,
               device: str | None = None) -> np.ndarray:
    """UMAP of every head: X (head, point, d), knn (head, point, >= n_neighbors) self first -> (head, point, 2)."""
    dev = _dev(device)
    with _cpu_threads(dev):
        return _umap(X, knn_idx, knn_dist, metric, n_neighbors, min_dist, n_epochs, negative_sample_rate,
                     negatives, learning_rate, seed, init, dev)


def _umap(X, knn_idx, knn_dist, metric, n_neighbors, min_dist, n_epochs, negative_sample_rate, negatives,
          learning_rate, seed, init, dev) -> np.ndarray:
    H, n, _ = X.shape
    nn = int(min(n_neighbors, n - 1))
    a, b = find_ab(1.0, min_dist)
    src, dst, wt = umap_graph(knn_idx, knn_dist, nn, n_epochs, dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    if init is None:
        Y = pca_init(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(dev), metric)
    else:
        Y = torch.from_numpy(np.asarray(init, np.float32)).to(dev)
    Y = Y - Y.mean(1, keepdim=True)
    Y = (Y * (10.0 / Y.abs().amax((1, 2), keepdim=True).clamp_min(1e-12))).contiguous()  # umap's +-10 box
    # Expected negatives per point and epoch: rate x the point's expected positive samples.
    nneg = torch.zeros(H * n, device=dev).index_add_(0, src, wt) * negative_sample_rate
    nneg = nneg / negatives
    hbase = (torch.arange(H, device=dev) * n).view(H, 1, 1)
    x, y = Y[:, :, 0].reshape(-1).clone(), Y[:, :, 1].reshape(-1).clone()  # flat: see tsne_batch
    w2 = 2.0 * wt  # x2: umap moves both ends of each directed edge and stores each pair both ways
    nneg = nneg.view(H, n, 1)
    for ep in range(n_epochs):
        alpha = learning_rate * (1.0 - ep / n_epochs)
        dx, dy = x[src] - x[dst], y[src] - y[dst]  # (edge,)
        d2 = dx * dx + dy * dy
        c = (-2.0 * a * b) * d2.clamp_min(1e-12).pow(b - 1.0) / (1.0 + a * d2.pow(b))
        sx = torch.zeros_like(x).index_add_(0, src, (c * dx).clamp_(-4, 4).mul_(w2))
        sy = torch.zeros_like(y).index_add_(0, src, (c * dy).clamp_(-4, 4).mul_(w2))
        s = (torch.randint(0, n, (H, n, negatives), generator=g, device=dev) + hbase).view(-1)
        rx = x.view(H, n, 1) - x[s].view(H, n, negatives)
        ry = y.view(H, n, 1) - y[s].view(H, n, negatives)
        d2r = rx * rx + ry * ry
        cr = torch.where(d2r > 0, 2.0 * b / ((0.001 + d2r) * (1.0 + a * d2r.pow(b))), torch.zeros_like(d2r))
        sx.view(H, n).add_((cr * rx).clamp_(-4, 4).mul_(nneg).sum(2))
        sy.view(H, n).add_((cr * ry).clamp_(-4, 4).mul_(nneg).sum(2))
        x.add_(sx, alpha=alpha)
        y.add_(sy, alpha=alpha)
    Y = torch.stack([x.view(H, n), y.view(H, n)], 2)
    return Y.cpu().numpy().astype(np.float32)
