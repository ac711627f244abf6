"""Judge backends: `hf` (a local transformers causal LM) and `openai` (any OpenAI-compatible endpoint).

A backend implements `pipeline.judges.judge.Backend`: `identity()` (what determines its answers,
for the cache key; never a secret) and `complete(requests, generation)` (yield answers as they
arrive).
"""
