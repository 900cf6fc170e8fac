"""Classification metrics, scoring a model on a split, and the base-vs-adapter report."""

from eval.metrics import classification_metrics, roc_auc
from eval.report import evaluate, format_table
from eval.score import answer_label, generate_answers, parse_final, score_examples
