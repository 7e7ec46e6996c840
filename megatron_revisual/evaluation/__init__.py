"""Evaluation on the ReVisual-R1 benchmarks (Geometry3K, WeMath, MathVista, MathVerse,
MathVision) through an OpenAI-compatible endpoint: `revisual eval` (see `runner`).

Modules: `datasets` (loaders and prompt formats), `grading` (answer extraction and math-verify
grading), `metrics` (accuracy, breakdowns, WeMath's four-dimensional metrics), `client`
(requests, retries, cache), `runner` (the command), `fixtures` (tiny datasets in each schema).
Heavy imports (openai, PIL, pyarrow, datasets) happen inside functions.
"""
