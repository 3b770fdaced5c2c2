"""Inference speed and memory of dense vs SVD-compressed checkpoints: ``.venv/bin/python -m benchmarks.inference``
(from the repository's root; ``--help`` lists the options, :mod:`benchmarks.inference.run` describes what is
measured).

- ``run``: the command line; builds the checkpoints, starts the workers, writes ``benchmarks/results/inference.*``;
- ``models``: the compressed checkpoints (made once, cached), loading them back, the fixed random batch;
- ``memory``: one model per process, its peak resident set through one prefill and one generation;
- ``timing``: every model in one process, timed round-robin; single layers in isolation;
- ``breakdown``: wall time per module category and forward phase (module hooks);
- ``report``: the Markdown table against SVD-LLM V2's published gains.
"""
