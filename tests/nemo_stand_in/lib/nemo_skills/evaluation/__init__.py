"""TEST STAND-IN for NeMo-Skills 0.7.0's evaluation package."""
