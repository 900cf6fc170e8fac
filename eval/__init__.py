"""Classification metrics, scoring a model on a split, and the base-vs-adapter report."""

from eval.metrics import classification_metrics, roc_auc
from eval.report import evaluate, format_table
# `classify` is the function; `python -m eval.classify` is its command line, a module nothing imports
# (importing it would put the module in the function's place here).
from eval.score import answer_label, classify, generate_answers, parse_final, score_examples
