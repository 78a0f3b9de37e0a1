"""Weighted k-nearest-neighbour classification of frozen features (DINO ``eval_knn.py``, solo-learn ``knn.py``).

Features are L2-normalised; a query's ``k`` most cosine-similar training samples vote for their class with weight
``exp(similarity / T)``; the classes ranked by their summed weight give top-1 / top-5. Ties are broken the same way
every time: among training samples tied at the ``k``-th similarity the lowest indices are taken, among classes tied
in score the lowest class index ranks first. Queries run in chunks, each one matrix product with the training
features, so memory stays ``chunk x N`` and 50,000 x 2,048 features take seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K = 20
TEMPERATURE = 0.07


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Class scores of each query.

    Args:
        train_features: ``(N, D)`` float, any norm.
        train_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        queries: ``(Q, D)`` float, any norm.
        k: neighbours per query (at most N are used).
        temperature: ``T`` of the weights ``exp(sim / T)``.
        chunk: queries per matrix product.

    Returns:
        ``(Q, num_classes)`` float32: the summed weights of each class among the query's ``k`` neighbours.
    """
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = F.normalize(queries[start:start + chunk].float(), dim=1) @ train.T  # (q, N)
        kth = sim.topk(k, dim=1).values[:, -1:]  # (q, 1): the k-th largest similarity
        above = sim > kth
        tied = sim == kth
        # Of the samples tied at the k-th similarity, the lowest indices fill the places left after those above:
        # exactly k per row, so the row-major nonzero() lists each query's k neighbours in index order.
        places = k - above.sum(1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(1) <= places))
        neighbours = chosen.nonzero()[:, 1].view(-1, k)  # (q, k)
        weights = (sim.gather(1, neighbours) / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        scores.append(votes.scatter_add_(1, train_labels[neighbours], weights))  # (q, C)
    return torch.cat(scores) if scores else queries.new_zeros(0, num_classes)


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
                 chunk: int = 1024) -> dict[str, float]:
    """kNN top-1 / top-5 (%) of the validation features against the training features."""
    scores = knn_scores(train_features, train_labels, val_features, num_classes, k, temperature, chunk)
    return topk_accuracy(scores, val_labels)
