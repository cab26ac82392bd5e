"""The compare engine and what it runs on: the model store (catalog.py), warm runtimes (pool.py),
the side-by-side engine (compare.py), public mode's policy and queue (public.py), the start-up
warm-up (warm.py). No Gradio here.
"""
