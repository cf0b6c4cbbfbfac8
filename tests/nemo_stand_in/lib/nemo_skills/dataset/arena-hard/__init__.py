"""TEST STAND-IN for NeMo-Skills 0.7.0's arena-hard settings module: judged by gpt-4.1 at
OpenAI by default, as the real one is."""
DATASET_GROUP = "chat"
METRICS_TYPE = "arena"
JUDGE_PIPELINE_ARGS = {"model": "gpt-4.1", "server_type": "openai",
                       "server_address": "https://api.openai.com/v1"}
