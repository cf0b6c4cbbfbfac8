"""TEST STAND-IN for NeMo-Skills 0.7.0's evaluator registry (EVALUATOR_MAP)."""
from nemo_skills.evaluation.evaluator.ifeval import eval_if

EVALUATOR_MAP = {"if": eval_if}
