"""Classification metrics for the jailbreak detector, from labels and scores; positive class = jailbreak.

Conventions for the cases that divide by zero (the same as scikit-learn's zero_division=0):
  precision with no positive predictions (tp + fp = 0)  -> 0.0
  recall    with no positive examples    (tp + fn = 0)  -> 0.0
  f1        when precision + recall = 0                  -> 0.0
  roc_auc   when only one class is present               -> None (undefined: there is no pair to rank)
An empty list of examples is an error, not a metric.
"""


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def roc_auc(labels: list[bool], scores: list[float]) -> float | None:
    """Area under the ROC curve: the chance that a random positive outranks a random negative, ties half.

    Computed from ranks (Mann-Whitney U): sort once, give tied scores their average rank; O(n log n).
    """
    n_pos = sum(1 for label in labels if label)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # each run of equal scores gets the mean of the ranks it spans (1-based)
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    positive_rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    u = positive_rank_sum - n_pos * (n_pos + 1) / 2  # pairs (positive, negative) the positive wins; ties half
    return u / (n_pos * n_neg)


def classification_metrics(labels: list[bool], scores: list[float], threshold: float = 0.5) -> dict:
    """tp, fp, tn, fn, accuracy, precision, recall, f1, roc_auc; predicted jailbreak iff score >= threshold."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores; expected one score per example")
    if not labels:
        raise ValueError("no examples to compute metrics on")
    tp = fp = tn = fn = 0
    for label, score in zip(labels, scores):
        predicted = score >= threshold
        if predicted and label:
            tp += 1
        elif predicted:
            fp += 1
        elif label:
            fn += 1
        else:
            tn += 1
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "roc_auc": roc_auc([bool(label) for label in labels], [float(s) for s in scores]),
    }
