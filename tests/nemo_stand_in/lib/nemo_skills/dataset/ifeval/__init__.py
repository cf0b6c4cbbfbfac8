"""TEST STAND-IN for NeMo-Skills 0.7.0's ifeval settings module: scored by the `if` evaluator,
which only runs inside NeMo-Skills' container."""
DATASET_GROUP = "chat"
METRICS_TYPE = "if"
EVAL_ARGS = "++eval_type=if ++generation_key=response"
