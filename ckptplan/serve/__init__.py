"""ckptplan as a service: ``ckptplan serve`` solves each distinct request once, keeps the answer in
SQLite and serves it to every rank and rerun; ``ckptplan solve --server URL`` (or
``ckptplan.solve(graph, budget, server=URL)``) traces locally and asks it.

Modules: ``wire`` (the graph upload format), ``store`` (the SQLite plan cache), ``pool`` (solves in
worker processes, single flight, bounded queue), ``pages`` (the review pages), ``app`` (the HTTP API),
``client`` (the stdlib-only client). Only ``app`` needs the ``ckptplan[serve]`` extra (FastAPI, uvicorn).
"""
