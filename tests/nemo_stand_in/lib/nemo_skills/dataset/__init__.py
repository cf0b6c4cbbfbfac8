"""TEST STAND-IN: NeMo-Skills' benchmark modules, one folder each (settings only)."""
