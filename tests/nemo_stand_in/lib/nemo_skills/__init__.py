"""TEST STAND-IN: makes tests/nemo_stand_in look like an environment with NeMo-Skills."""
