"""Side-by-side benchmark of Shears against llm-compressor (the peer): `make bench-peers`.

- measure.py: run a child process, its wall time and peak RSS; sparsity of a folder on disk.
- tools.py: one run of each tool as a child process, as a `ToolResult`.
- report.py: rows, ratios, the JSON, the markdown table and the charts.
- synthetic.py: a random-weight Llama-style model of a given width (time and memory vs size).
- run.py: the orchestrator.
- run_llmcompressor.py: the peer's side, run with the peer venv's python (imports nothing from here).
"""
