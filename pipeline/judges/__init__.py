"""Clinical-relevance consensus scoring of dispreferred responses by a panel of LLM judges (MMedPO §3.2–3.3).

Modules: `panel` (configuration from params.yaml), `prompts` (the versioned templates in
`prompts.yaml`), `parsing` (strict reading of a judge's JSON answer), `cache` (the persistent
response cache), `judge` (a judge = backend + cache), `backends` (`hf`, `openai`), `consensus`
(the multi-judge protocol), `weights` (scores to DPO weights), `scoring` (ranked rows to scored
rows), `metrics` (the stage report). See docs/judges.md.
"""
