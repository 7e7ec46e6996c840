"""Evaluation on the benchmarks of the ReVisual-R1 paper's Table 2 (MathVerse, MathVision,
MathVista, DynaMath, WeMath, LogicVista, AIME 2024 / 2025, GPQA, MATH-500) and Geometry3K through
an OpenAI-compatible endpoint: `revisual eval` (see `runner`).

Modules: `datasets` (finding the files; the sets `all` / `paper`), `benchmarks_vision` and
`benchmarks_text` (a loader and prompt format per benchmark), `samples` (what they share),
`grading` (answer extraction, math-verify and the benchmarks' own rules), `metrics` (accuracy,
breakdowns, WeMath's four dimensions, DynaMath's worst case, pass@k), `tables` (the paper's
table layout, `--compare`, the paper's numbers in `paper_table2.json`), `client` (requests,
retries, cache), `runner` (the command). Tiny datasets in each release's schema, for tests and
benchmarks, are in `megatron_revisual.testing.eval_fixtures`. Heavy imports (openai, PIL,
pyarrow, datasets) happen inside functions.
"""
