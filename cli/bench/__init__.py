"""``tandem bench``: a load generator for any Tandem router, and its report.

Modules, in the order a run uses them:

- :mod:`cli.bench.workload`: what to send and when (arrival times, prompt and output
  lengths, ShareGPT-style datasets, shared-prefix groups).
- :mod:`cli.bench.runner`: drives ``tandem.v1.Generation/GenerateStream`` with
  ``grpc.aio`` and records every request's timings.
- :mod:`cli.bench.report`: TTFT, TPOT, ITL, end-to-end latency, throughput and goodput;
  the table, the JSON document and a Markdown table.
- :mod:`cli.bench.plots`: latency CDFs and goodput against request rate (PNG).
- :mod:`cli.bench.command`: the ``tandem bench`` options and entry point.

Only the public gRPC API is used, so the same bench compares any two deployments.
"""
