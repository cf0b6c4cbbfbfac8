"""Synthetic data, stage=synthesize: `magpie` (the pre-query text from a chat template),
`pipeline` (the steps, their shards and deadlines), `filters` (what is dropped and why), `card`
(synth.md)."""
