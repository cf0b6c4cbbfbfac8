"""TEST STAND-IN for NeMo-Skills 0.7.0's gsm8k settings module (its data: test.jsonl)."""
DATASET_GROUP = "math"
METRICS_TYPE = "math"
