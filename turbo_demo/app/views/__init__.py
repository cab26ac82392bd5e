"""Records -> plain data: the compare view (compare.py), the token inspector (inspector.py), the
teaching views (teaching.py: Neurons, Why dReLU), the paper table (paper.py), a run's export
(export.py). No Gradio here.
"""
