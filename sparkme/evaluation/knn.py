"""Weighted k-nearest-neighbour classification of frozen features (DINO ``eval_knn.py``, solo-learn ``knn.py``).

Features are L2-normalised; a query's ``k`` most cosine-similar training samples vote for their class with weight
``exp(similarity / T)``; the classes ranked by their summed weight give top-1 / top-5. Ties are broken the same way
every time: among training samples tied at the ``k``-th similarity the lowest indices are taken, among classes tied
in score the lowest class index ranks first. Queries run in chunks against blocks of training rows, each block
normalised on the fly in float32 and its ``k`` best merged into the chunk's running ``k`` best: memory stays
``chunk x block`` besides the bank itself (no normalised copy of it, as DINO's), so an ImageNet-size bank
(1.28M x 2,048) needs only its own size, half of it stored as float16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K = 20
TEMPERATURE = 0.07


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024, block: int = 4096) -> torch.Tensor:
    """Class scores of each query.

    Args:
        train_features: ``(N, D)`` float (float16 halves the bank; similarities are computed in float32), any norm.
        train_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        queries: ``(Q, D)`` float, any norm.
        k: neighbours per query (at most N are used).
        temperature: ``T`` of the weights ``exp(sim / T)``.
        chunk: queries per matrix product.
        block: training rows per matrix product.

    Returns:
        ``(Q, num_classes)`` float32: the summed weights of each class among the query's ``k`` neighbours.
    """
    train_labels = train_labels.long().to(train_features.device)
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        query = F.normalize(queries[start:start + chunk].float(), dim=1)
        best_sim = best_index = None
        for first in range(0, train_features.shape[0], block):
            sim = _block_similarities(query, train_features, first, block)  # (q, block)
            block_sim, block_index = _k_best(sim, min(k, sim.shape[1]))
            block_index = block_index + first
            if best_sim is None:
                best_sim, best_index = block_sim, block_index
                continue
            # earlier blocks hold lower indices: the stable sort by similarity keeps the lower index first on ties
            order = torch.sort(torch.cat([best_sim, block_sim], 1), dim=1, descending=True, stable=True).indices
            best_sim = torch.cat([best_sim, block_sim], 1).gather(1, order[:, :k])
            best_index = torch.cat([best_index, block_index], 1).gather(1, order[:, :k])
        # in index order, as one product over the whole bank would add them
        best_index, order = best_index.sort(dim=1)
        weights = (best_sim.gather(1, order) / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, train_labels[best_index], weights))  # (q, C)
    return torch.cat(scores) if scores else queries.new_zeros(0, num_classes)


def _block_similarities(query: torch.Tensor, train_features: torch.Tensor, first: int, block: int) -> torch.Tensor:
    """Cosine similarities ``(q, n)`` of the normalised queries with training rows ``first .. first + block - 1``.

    When the bank spans several blocks, the last one is padded with zero rows to ``block`` rows (their columns are
    dropped): every product then has one shape, so that equal rows in different blocks get equal similarities and
    tie as in one product."""
    rows = F.normalize(train_features[first:first + block].float(), dim=1)
    if len(rows) == block or len(rows) == len(train_features):
        return query @ rows.T
    padded = torch.cat([rows, rows.new_zeros(block - len(rows), rows.shape[1])])
    return (query @ padded.T)[:, :len(rows)]


def _k_best(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest similarities of each row of ``(q, n)`` ``sim`` and their column indices ``(q, k)``, in
    index order; of the columns tied at the ``k``-th similarity, the lowest indices."""
    kth = sim.topk(k, dim=1).values[:, -1:]  # (q, 1): the k-th largest similarity
    above = sim > kth
    tied = sim == kth
    # Of the samples tied at the k-th similarity, the lowest indices fill the places left after those above:
    # exactly k per row, so the row-major nonzero() lists each query's k neighbours in index order.
    places = k - above.sum(1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(1) <= places))
    neighbours = chosen.nonzero()[:, 1].view(-1, k)  # (q, k)
    return sim.gather(1, neighbours), neighbours


def ranked_classes(scores: torch.Tensor) -> torch.Tensor:
    """``(Q, C)`` scores -> ``(Q, C)`` class indices, best first; equal scores keep the lower class first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` of ``(Q, C)`` scores against ``(Q,)`` labels (top-k with k >= C is 100 %)."""
    ranked = ranked_classes(scores)
    hits = ranked == labels.view(-1, 1).to(ranked.device)
    return {f"top{k}": 100.0 * hits[:, :k].any(1).float().mean().item() for k in ks}


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = K, temperature: float = TEMPERATURE,
                 chunk: int = 1024, block: int = 4096) -> dict[str, float]:
    """kNN top-1 / top-5 (%) of the validation features against the training features (float32 or float16)."""
    scores = knn_scores(train_features, train_labels, val_features, num_classes, k, temperature, chunk, block)
    return topk_accuracy(scores, val_labels)
