"""Evaluation backends and the cells they write (DESIGN, Run directory)."""
