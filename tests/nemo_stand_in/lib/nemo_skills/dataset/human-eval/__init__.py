"""TEST STAND-IN for NeMo-Skills 0.7.0's human-eval settings module (its data: test.jsonl)."""
DATASET_GROUP = "code"
METRICS_TYPE = "evalplus"
